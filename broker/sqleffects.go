package broker

import "strings"

// SQL statements share the namespaces of the extended protocol: PREPARE and
// DEALLOCATE create and remove the same named statements Parse and Close
// do, DISCARD ALL removes them all, DECLARE and CLOSE create and remove
// portals. The tracker reads them from the text of what the client runs
// (parseSQLEffects, before it is forwarded) and applies each one when its
// command tag arrives, in order, so only what the server did counts.

type effectKind uint8

const (
	effPrepare    effectKind = iota + 1 // PREPARE name AS …   (tag PREPARE)
	effDeallocate                       // DEALLOCATE name      (tag DEALLOCATE)
	effDeallocAll                       // DEALLOCATE ALL       (tag DEALLOCATE ALL)
	effDiscardAll                       // DISCARD ALL          (tag DISCARD ALL)
	effDeclare                          // DECLARE name CURSOR  (tag DECLARE CURSOR)
	effClose                            // CLOSE name           (tag CLOSE CURSOR)
	effCloseAll                         // CLOSE ALL            (tag CLOSE CURSOR ALL)
)

type sqlEffect struct {
	kind effectKind
	name string
}

// sqlEffects are the namespace changes a query string may make, in order.
// src is the whole query string: what the server keeps as the text of a
// statement it prepares (pg_prepared_statements.statement).
type sqlEffects struct {
	list []sqlEffect
	next int
	src  string
}

func (e *sqlEffects) touchesStmts() bool {
	if e == nil {
		return false
	}
	for _, f := range e.list {
		switch f.kind {
		case effPrepare, effDeallocate, effDeallocAll, effDiscardAll:
			return true
		}
	}
	return false
}

func (e *sqlEffects) touchesPortals() bool {
	if e == nil {
		return false
	}
	for _, f := range e.list {
		switch f.kind {
		case effDeclare, effClose, effCloseAll, effDiscardAll:
			return true
		}
	}
	return false
}

// tagKind maps a command tag to the effect it completes.
func tagKind(tag string) effectKind {
	switch tag {
	case "PREPARE":
		return effPrepare
	case "DEALLOCATE":
		return effDeallocate
	case "DEALLOCATE ALL":
		return effDeallocAll
	case "DISCARD ALL":
		return effDiscardAll
	case "DECLARE CURSOR":
		return effDeclare
	case "CLOSE CURSOR":
		return effClose
	case "CLOSE CURSOR ALL":
		return effCloseAll
	}
	return 0
}

// apply makes the effect a command tag completes. Called with mu held.
func (t *tracker) apply(e *sqlEffects, tag string) {
	k := tagKind(tag)
	if k == 0 {
		return
	}
	if e == nil {
		// The server did something pgward's reading of the text missed.
		e = &sqlEffects{}
	}
	var f sqlEffect
	for e.next < len(e.list) {
		f = e.list[e.next]
		e.next++
		if f.kind == k {
			break
		}
		f = sqlEffect{}
	}
	switch k {
	case effPrepare:
		if f.kind == k {
			t.stmts[f.name] = &stmtInfo{text: e.src, fromSQL: true}
		}
	case effDeallocate:
		if f.kind == k {
			delete(t.stmts, f.name)
		}
	case effDeallocAll, effDiscardAll:
		for name := range t.stmts {
			if name != "" {
				delete(t.stmts, name)
			}
		}
		if k == effDiscardAll {
			t.dropAllPortals()
		}
	case effDeclare:
		if f.kind == k {
			t.dropPortal(f.name)
			t.portals[f.name] = &portalInfo{name: f.name, stmt: &stmtInfo{text: e.src}}
		}
	case effClose:
		if f.kind == k {
			t.dropPortal(f.name)
		}
	case effCloseAll:
		t.dropAllPortals()
	}
}

// parseSQLEffects finds PREPARE, DEALLOCATE, DISCARD ALL, DECLARE and CLOSE
// statements in a query string, or returns nil when there are none (the
// usual case, cheap: no allocation).
func parseSQLEffects(text []byte) *sqlEffects {
	if !mayHaveEffects(text) {
		return nil
	}
	var e *sqlEffects
	lx := sqlLexer{s: text}
	for !lx.done() {
		if f, ok := lx.statement(); ok {
			if e == nil {
				e = &sqlEffects{src: string(text)}
			}
			e.list = append(e.list, f)
		}
	}
	return e
}

// mayHaveEffects is a quick filter: a keyword's first three letters.
func mayHaveEffects(b []byte) bool {
	for i := 0; i+3 <= len(b); i++ {
		c := b[i] | 0x20
		if c != 'p' && c != 'd' && c != 'c' {
			continue
		}
		w := [3]byte{c, b[i+1] | 0x20, b[i+2] | 0x20}
		switch string(w[:]) {
		case "pre", "dea", "dis", "dec", "clo":
			return true
		}
	}
	return false
}

// sqlLexer reads the leading words of each statement of a query string,
// skipping what PostgreSQL's lexer skips: whitespace, -- and nested /* */
// comments; and it finds the statement's end (a ; outside string constants,
// quoted identifiers, dollar quotes, comments and parentheses).
type sqlLexer struct {
	s []byte
	i int
}

func (l *sqlLexer) done() bool { return l.i >= len(l.s) }

// statement reads one statement and reports the effect it has, if any.
func (l *sqlLexer) statement() (sqlEffect, bool) {
	var words [8]string
	n := 0
	kw := func(k int) string {
		if k < n {
			return words[k]
		}
		return ""
	}
	var f sqlEffect
	ok := false
	decided := false
	for {
		tok, ident, end := l.token()
		if end {
			break
		}
		if decided {
			continue
		}
		if n < len(words) {
			if ident {
				words[n] = "\x00" + tok // a quoted identifier: never a keyword
			} else {
				words[n] = tok
			}
			n++
		}
		w0 := kw(0)
		switch {
		case w0 == "prepare" && n >= 3:
			// PREPARE name [ ( types ) ] AS
			f, ok, decided = sqlEffect{kind: effPrepare, name: identName(words[1])}, words[1] != "", true
		case w0 == "deallocate" && n >= 2:
			w := words[1]
			if w == "prepare" {
				if n < 3 {
					continue
				}
				w = words[2]
			}
			if w == "all" {
				f = sqlEffect{kind: effDeallocAll}
			} else {
				f = sqlEffect{kind: effDeallocate, name: identName(w)}
			}
			ok, decided = true, true
		case w0 == "discard" && n >= 2:
			ok, decided = words[1] == "all", true
			f = sqlEffect{kind: effDiscardAll}
		case w0 == "declare" && n >= 2:
			f, ok, decided = sqlEffect{kind: effDeclare, name: identName(words[1])}, true, true
		case w0 == "close" && n >= 2:
			if words[1] == "all" {
				f = sqlEffect{kind: effCloseAll}
			} else {
				f = sqlEffect{kind: effClose, name: identName(words[1])}
			}
			ok, decided = true, true
		case n >= 1 && w0 != "prepare" && w0 != "deallocate" && w0 != "discard" && w0 != "declare" && w0 != "close":
			decided = true
		}
	}
	return f, ok
}

// identName is the name an identifier token stands for: a quoted one as
// written, an unquoted one folded to lower case (already done by token).
func identName(w string) string {
	if strings.HasPrefix(w, "\x00") {
		return w[1:]
	}
	return w
}

// token returns the next word of the current statement: a keyword or
// unquoted identifier folded to lower case, a quoted identifier (ident
// true), or punctuation and constants as a placeholder. end is true at the
// statement's end (its ; is consumed) or the end of the text.
func (l *sqlLexer) token() (tok string, ident bool, end bool) {
	s := l.s
	for l.i < len(s) {
		c := s[l.i]
		switch {
		case c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v':
			l.i++
		case c == '-' && l.i+1 < len(s) && s[l.i+1] == '-':
			for l.i < len(s) && s[l.i] != '\n' {
				l.i++
			}
		case c == '/' && l.i+1 < len(s) && s[l.i+1] == '*':
			depth := 0
			for l.i < len(s) {
				if s[l.i] == '/' && l.i+1 < len(s) && s[l.i+1] == '*' {
					depth++
					l.i += 2
				} else if s[l.i] == '*' && l.i+1 < len(s) && s[l.i+1] == '/' {
					depth--
					l.i += 2
					if depth == 0 {
						break
					}
				} else {
					l.i++
				}
			}
		case c == ';':
			l.i++
			return "", false, true
		case c == '\'':
			l.skipString(false)
			return "'", false, false
		case (c == 'e' || c == 'E') && l.i+1 < len(s) && s[l.i+1] == '\'':
			l.i++
			l.skipString(true)
			return "'", false, false
		case c == '"':
			l.i++
			start := l.i
			var b []byte
			for l.i < len(s) {
				if s[l.i] == '"' {
					if l.i+1 < len(s) && s[l.i+1] == '"' {
						b = append(b, s[start:l.i+1]...)
						l.i += 2
						start = l.i
						continue
					}
					break
				}
				l.i++
			}
			b = append(b, s[start:min(l.i, len(s))]...)
			l.i++
			return string(clipName(b)), true, false
		case c == '$':
			if l.skipDollar() {
				return "$", false, false
			}
			l.i++
			return "$", false, false
		case c == '(':
			// Parenthesised lists (PREPARE's types) may hold anything but a
			// statement end at depth 0; read through them as one token.
			depth := 0
			for l.i < len(s) {
				switch s[l.i] {
				case '(':
					depth++
				case ')':
					depth--
				case '\'':
					l.skipString(false)
					continue
				case '"':
					l.i++
					for l.i < len(s) && s[l.i] != '"' {
						l.i++
					}
				}
				l.i++
				if depth == 0 {
					break
				}
			}
			return "(", false, false
		case isIdentStart(c):
			start := l.i
			for l.i < len(s) && isIdentCont(s[l.i]) {
				l.i++
			}
			return foldIdent(s[start:l.i]), false, false
		default:
			l.i++
			return string(c), false, false
		}
	}
	return "", false, true
}

// skipString skips a '…' constant (” doubles a quote; in an E” string a
// backslash escapes the next byte). Unterminated: to the end.
func (l *sqlLexer) skipString(escapes bool) {
	s := l.s
	l.i++ // the opening quote
	for l.i < len(s) {
		switch s[l.i] {
		case '\\':
			if escapes {
				l.i += 2
				continue
			}
		case '\'':
			if l.i+1 < len(s) && s[l.i+1] == '\'' {
				l.i += 2
				continue
			}
			l.i++
			return
		}
		l.i++
	}
}

// skipDollar skips a $tag$…$tag$ constant at l.i, or returns false when
// the $ does not open one ($1 is a parameter).
func (l *sqlLexer) skipDollar() bool {
	s := l.s
	j := l.i + 1
	for j < len(s) && s[j] != '$' {
		if !isIdentCont(s[j]) || (j == l.i+1 && s[j] >= '0' && s[j] <= '9') {
			return false
		}
		j++
	}
	if j >= len(s) {
		return false
	}
	delim := s[l.i : j+1]
	k := indexBytes(s[j+1:], delim)
	if k < 0 {
		l.i = len(s)
		return true
	}
	l.i = j + 1 + k + len(delim)
	return true
}

// foldIdent is an unquoted identifier as PostgreSQL stores it: ASCII
// letters folded to lower case, truncated to NAMEDATALEN-1 bytes.
func foldIdent(b []byte) string {
	out := make([]byte, len(b))
	for i, c := range b {
		if c >= 'A' && c <= 'Z' {
			c += 'a' - 'A'
		}
		out[i] = c
	}
	return string(clipName(out))
}

// maxNameLen is NAMEDATALEN-1: the server keeps at most this many bytes of
// a statement, portal or identifier name (longer ones are truncated, so two
// long names that share their first 63 bytes are one name).
const maxNameLen = 63

// clipName truncates b to maxNameLen bytes, at a UTF-8 character start.
func clipName(b []byte) []byte {
	if len(b) <= maxNameLen {
		return b
	}
	n := maxNameLen
	for n > 0 && b[n]&0xc0 == 0x80 {
		n--
	}
	return b[:n]
}

func indexBytes(s, sub []byte) int {
	return strings.Index(string(s), string(sub))
}

func isIdentStart(c byte) bool {
	return c == '_' || (c|0x20 >= 'a' && c|0x20 <= 'z') || c >= 0x80
}

func isIdentCont(c byte) bool {
	return isIdentStart(c) || (c >= '0' && c <= '9') || c == '$'
}
