package exporter

import (
	"slices"
	"strings"
)

// Password literals never reach the audit trail. redactSQL lexes a statement
// the way PostgreSQL's scanner (src/backend/parser/scan.l) does, finds every
// string constant that directly follows the keyword PASSWORD — as in
// CREATE/ALTER ROLE|USER|GROUP … [WITH] [ENCRYPTED] PASSWORD '…' and
// CREATE/ALTER USER MAPPING … OPTIONS (password '…') — and replaces it with
// '[REDACTED]'. A $n parameter in that place is reported so its bound value is
// redacted whatever the parameter mode.
//
// What the lexer knows, because each of these changes where a literal ends:
//   - plain '…' with '' for a quote; E'…' with backslash escapes (\' and \\
//     included); U&'…' with an optional UESCAPE '…' after it; B'…' and X'…',
//     which have no escapes at all; N'…', a plain literal;
//   - string continuation: two string constants separated only by whitespace
//     that contains a newline (and -- comments) are one constant, the second
//     part read the same way as the first;
//   - dollar quoting, $$…$$ and $tag$…$tag$, where the tag follows identifier
//     rules without $, so $1 is a parameter and a$b$ an identifier;
//   - -- comments, nested /* /* */ */ comments, "quoted" identifiers.
//
// Whatever follows a password constant and is itself a string constant
// (separated by whitespace or comments only) is redacted with it: 'a' 'b' on
// one line is a syntax error to PostgreSQL, not a continuation, but both
// parts are plainly the password the client meant. So is UESCAPE '…'.
//
// pgward does not know a session's standard_conforming_strings. When it is
// off, a plain '…' literal takes backslash escapes, which moves where it ends
// and with it every token after it. So a statement with a backslash is lexed
// twice, once with each setting, and the union of the two sets of redacted
// spans is replaced: whichever way the server reads the text, its password
// literals are gone. A "password" quoted identifier counts as the keyword
// too: it is how OPTIONS ("password" '…') names the user mapping's password.

// redactedError stands for the server's error message on a statement that
// mentions a password.
const redactedError = "[REDACTED: the statement mentions a password; the server's message may quote it]"

// mentionsPassword reports whether a statement contains the word password in
// any case: whether its error message may quote a password.
func mentionsPassword(sql string) bool { return containsFoldASCII(sql, "password") }

// redactSQL returns sql with password literals replaced, and the 1-based
// numbers of the parameters that stand for passwords. It returns sql itself
// and nil, allocating nothing, when sql does not contain "password".
func redactSQL(sql string) (string, []int) {
	if !containsFoldASCII(sql, "password") {
		return sql, nil
	}
	var (
		r   redaction
		buf [4][2]int // room for two clauses read two ways, without allocating
	)
	r.spans = buf[:0]
	(&lexer{sql: sql, std: true}).scan(&r)
	if strings.IndexByte(sql, '\\') >= 0 {
		// Only a backslash makes the two readings differ. Each pass yields
		// its spans in order; together they may overlap.
		(&lexer{sql: sql, std: false}).scan(&r)
		slices.SortFunc(r.spans, func(a, b [2]int) int { return a[0] - b[0] })
	}
	if len(r.spans) == 0 {
		return sql, r.params
	}
	const redacted = "'" + redactedValue + "'"
	// merged calls f with each run of overlapping spans as one.
	merged := func(f func(start, end int)) {
		for i := 0; i < len(r.spans); {
			start, end := r.spans[i][0], r.spans[i][1]
			for i++; i < len(r.spans) && r.spans[i][0] < end; i++ {
				end = max(end, r.spans[i][1])
			}
			f(start, end)
		}
	}
	// The exact size, so that a statement of many password literals is
	// written once, not copied each time the builder outgrows its buffer.
	size := len(sql)
	merged(func(start, end int) { size += len(redacted) - (end - start) })
	var b strings.Builder
	b.Grow(size)
	last := 0
	merged(func(start, end int) {
		b.WriteString(sql[last:start])
		b.WriteString(redacted)
		last = end
	})
	b.WriteString(sql[last:])
	return b.String(), r.params
}

// redaction collects what the lexer passes found.
type redaction struct {
	spans  [][2]int // [start, end) of password literals, possibly overlapping
	params []int    // parameter numbers in PASSWORD position, no duplicates
}

// lexer is one reading of a statement: std is standard_conforming_strings.
type lexer struct {
	sql string
	std bool
}

type tokKind uint8

const (
	tokSpace       tokKind = iota // whitespace or a comment
	tokString                     // a string constant of any form, continuations included
	tokParam                      // $n
	tokIdent                      // an unquoted identifier or keyword
	tokQuotedIdent                // "…" or U&"…"
	tokOther                      // anything else: operators, punctuation, numbers
)

// strMode says how the body of a quoted string constant is read.
type strMode uint8

const (
	modeStd     strMode = iota // '' is a quote, backslash is a plain byte (xq, xus)
	modeEscape                 // '' and backslash escapes (xe)
	modeNoQuote                // the first quote ends it (xb, xh)
)

// scan adds the password spans and parameters of this reading to r.
func (l *lexer) scan(r *redaction) {
	sql := l.sql
	after := false // the last token other than whitespace was PASSWORD
	for i := 0; i < len(sql); {
		kind, end := l.token(i)
		switch kind {
		case tokSpace:
		case tokString:
			if after {
				end = l.absorb(end)
				r.spans = append(r.spans, [2]int{i, end})
			}
			after = false
		case tokParam:
			if after {
				n := 0
				for _, c := range []byte(sql[i+1 : end]) {
					if n < 1<<20 {
						n = n*10 + int(c-'0')
					}
				}
				if !slices.Contains(r.params, n) {
					r.params = append(r.params, n)
				}
			}
			after = false
		case tokIdent:
			after = equalFoldASCII(sql[i:end], "password")
		case tokQuotedIdent:
			after = sql[i:end] == `"password"`
		default:
			after = false
		}
		i = end
	}
}

// absorb extends a password constant ending at i over the string constants
// and UESCAPE clauses that follow it with only whitespace or comments between,
// and returns the end of the last one.
func (l *lexer) absorb(i int) int {
	end := i
	for j := i; j < len(l.sql); {
		kind, next := l.token(j)
		switch {
		case kind == tokSpace:
		case kind == tokString:
			end = next
		case kind == tokIdent && equalFoldASCII(l.sql[j:next], "uescape"):
			end = next
		default:
			return end
		}
		j = next
	}
	return end
}

// token returns the kind of the token that starts at sql[i] and the index
// after it.
func (l *lexer) token(i int) (tokKind, int) {
	sql := l.sql
	c := sql[i]
	switch {
	case isSpace(c):
		j := i + 1
		for j < len(sql) && isSpace(sql[j]) {
			j++
		}
		return tokSpace, j
	case c == '-' && i+1 < len(sql) && sql[i+1] == '-':
		return tokSpace, lineCommentEnd(sql, i)
	case c == '/' && i+1 < len(sql) && sql[i+1] == '*':
		return tokSpace, blockCommentEnd(sql, i)
	case c == '\'':
		return tokString, l.stringEnd(i, l.plainMode())
	case c == '"':
		return tokQuotedIdent, quotedEnd(sql, i, '"')
	case c == '$':
		j := i + 1
		if j < len(sql) && isDigit(sql[j]) {
			for j < len(sql) && isDigit(sql[j]) {
				j++
			}
			return tokParam, j
		}
		if end, ok := dollarQuoteEnd(sql, i); ok {
			return tokString, end
		}
		return tokOther, i + 1
	case isIdentStart(c):
		if i+1 < len(sql) && sql[i+1] == '\'' {
			switch c {
			case 'e', 'E':
				return tokString, l.stringEnd(i+1, modeEscape)
			case 'b', 'B', 'x', 'X':
				return tokString, l.stringEnd(i+1, modeNoQuote)
			case 'n', 'N':
				return tokString, l.stringEnd(i+1, l.plainMode())
			}
		}
		if (c == 'u' || c == 'U') && i+2 < len(sql) && sql[i+1] == '&' {
			switch sql[i+2] {
			case '\'':
				// With standard_conforming_strings off the server refuses
				// U&'…' outright; the text is still audited, so read it
				// both ways like a plain literal.
				return tokString, l.stringEnd(i+2, l.plainMode())
			case '"':
				return tokQuotedIdent, quotedEnd(sql, i+2, '"')
			}
		}
		j := i + 1
		for j < len(sql) && isIdentCont(sql[j]) {
			j++
		}
		return tokIdent, j
	default:
		return tokOther, i + 1
	}
}

// plainMode is how this reading takes a plain '…' literal.
func (l *lexer) plainMode() strMode {
	if l.std {
		return modeStd
	}
	return modeEscape
}

// stringEnd returns the index after the string constant whose opening quote
// is sql[q], read in mode m, with every continuation. An unterminated
// constant runs to the end of the text.
func (l *lexer) stringEnd(q int, m strMode) int {
	sql := l.sql
	for {
		end, ok := quotedBodyEnd(sql, q, m)
		if !ok {
			return len(sql)
		}
		next, cont := continuation(sql, end)
		if !cont {
			return end
		}
		q = next
	}
}

// quotedBodyEnd returns the index after the quote that closes the body opened
// by the quote at sql[q], and false when nothing closes it.
func quotedBodyEnd(sql string, q int, m strMode) (int, bool) {
	for j := q + 1; j < len(sql); j++ {
		switch sql[j] {
		case '\\':
			if m == modeEscape {
				j++ // the escaped byte, whatever it is
			}
		case '\'':
			if m != modeNoQuote && j+1 < len(sql) && sql[j+1] == '\'' {
				j++
				continue
			}
			return j + 1, true
		}
	}
	return len(sql), false
}

// continuation reports whether a string constant that ended at i goes on:
// whitespace with at least one newline (-- comments allowed, /* */ not)
// followed by a quote. It returns the index of that quote.
func continuation(sql string, i int) (int, bool) {
	newline := false
	for i < len(sql) {
		switch c := sql[i]; {
		case c == '\n' || c == '\r':
			newline = true
			i++
		case c == ' ' || c == '\t' || c == '\f' || c == '\v':
			i++
		case c == '-' && i+1 < len(sql) && sql[i+1] == '-':
			i = lineCommentEnd(sql, i)
		case c == '\'':
			return i, newline
		default:
			return 0, false
		}
	}
	return 0, false
}

// quotedEnd returns the index after a quoted token opened by q at sql[i],
// where a doubled q stands for itself.
func quotedEnd(sql string, i int, q byte) int {
	for j := i + 1; j < len(sql); j++ {
		if sql[j] == q {
			if j+1 < len(sql) && sql[j+1] == q {
				j++
				continue
			}
			return j + 1
		}
	}
	return len(sql)
}

// dollarQuoteEnd recognises $tag$…$tag$ at sql[i] and returns the index after
// it (the end of the text when it is not closed). The tag is empty or an
// identifier without $; the constant ends at the first repetition of the
// opening delimiter, which is where PostgreSQL's scanner ends it too.
func dollarQuoteEnd(sql string, i int) (int, bool) {
	j := i + 1
	if j < len(sql) && isDigit(sql[j]) {
		return 0, false
	}
	for j < len(sql) && isIdentStart(sql[j]) || j < len(sql) && isDigit(sql[j]) {
		j++
	}
	if j >= len(sql) || sql[j] != '$' {
		return 0, false
	}
	delim := sql[i : j+1]
	if k := strings.Index(sql[j+1:], delim); k >= 0 {
		return j + 1 + k + len(delim), true
	}
	return len(sql), true
}

// lineCommentEnd returns the index of the newline that ends the -- comment
// at sql[i], or the end of the text.
func lineCommentEnd(sql string, i int) int {
	for i < len(sql) && sql[i] != '\n' && sql[i] != '\r' {
		i++
	}
	return i
}

// blockCommentEnd returns the index after the /* comment at sql[i], counting
// nested /* */ pairs; an unterminated comment runs to the end of the text.
func blockCommentEnd(sql string, i int) int {
	depth := 0
	for i < len(sql) {
		switch {
		case sql[i] == '/' && i+1 < len(sql) && sql[i+1] == '*':
			depth++
			i += 2
		case sql[i] == '*' && i+1 < len(sql) && sql[i+1] == '/':
			depth--
			i += 2
			if depth == 0 {
				return i
			}
		default:
			i++
		}
	}
	return i
}

func isSpace(c byte) bool {
	return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'
}

func isDigit(c byte) bool { return c >= '0' && c <= '9' }

func isIdentStart(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c == '_' || c >= 0x80
}

func isIdentCont(c byte) bool { return isIdentStart(c) || isDigit(c) || c == '$' }

// containsFoldASCII reports whether s contains the lower-case ASCII word,
// ignoring ASCII case, without allocating. It jumps between the places where
// the word's first letter occurs, in either case, with strings.IndexByte, so
// text without that letter costs almost nothing.
func containsFoldASCII(s, lower string) bool {
	n := len(lower)
	lo, up := lower[0], lower[0]
	if lo >= 'a' && lo <= 'z' {
		up = lo - ('a' - 'A')
	}
	nextLo, nextUp := -1, -1 // next occurrence at or after i; -1: not searched yet
	for i := 0; i+n <= len(s); {
		if nextLo < i {
			if nextLo = strings.IndexByte(s[i:], lo); nextLo >= 0 {
				nextLo += i
			} else {
				nextLo = len(s)
			}
		}
		if nextUp < i {
			if nextUp = strings.IndexByte(s[i:], up); nextUp >= 0 {
				nextUp += i
			} else {
				nextUp = len(s)
			}
		}
		i = min(nextLo, nextUp)
		if i+n > len(s) {
			return false
		}
		if equalFoldASCII(s[i:i+n], lower) {
			return true
		}
		i++
	}
	return false
}

// equalFoldASCII reports whether s is the lower-case ASCII word lower,
// ignoring ASCII case.
func equalFoldASCII(s, lower string) bool {
	if len(s) != len(lower) {
		return false
	}
	for k := 0; k < len(s); k++ {
		c := s[k]
		if c >= 'A' && c <= 'Z' {
			c += 'a' - 'A'
		}
		if c != lower[k] {
			return false
		}
	}
	return true
}
