package exporter

import (
	"strings"
)

// Password literals never reach the audit trail. redactSQL finds every string
// literal (plain, E'…', U&'…', or dollar-quoted) that directly follows the
// keyword PASSWORD — as in CREATE/ALTER ROLE|USER|GROUP … [ENCRYPTED] PASSWORD
// '…' and CREATE/ALTER USER MAPPING … OPTIONS (password '…') — and replaces it
// with '[REDACTED]'. A $n parameter in that place is reported so its bound
// value is redacted whatever the parameter mode. The lexer knows comments,
// quoted identifiers and dollar quoting, so a PASSWORD inside those does not
// count, and a literal hidden behind a comment still does.
//
// A plain literal is ambiguous when standard_conforming_strings is off
// (backslash escapes a quote); the redaction then covers the longer of the two
// readings, so no part of the secret is left behind.

// redactSQL returns sql with password literals replaced, and the 1-based
// numbers of the parameters that stand for passwords. It returns sql itself
// and nil, allocating nothing, when sql does not contain "password".
func redactSQL(sql string) (string, []int) {
	if !containsFoldASCII(sql, "password") {
		return sql, nil
	}
	var (
		spans  [][2]int
		params []int
		after  bool // the previous token was the keyword PASSWORD
	)
	for i := 0; i < len(sql); {
		c := sql[i]
		switch {
		case c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v':
			i++
		case c == '-' && i+1 < len(sql) && sql[i+1] == '-':
			for i < len(sql) && sql[i] != '\n' {
				i++
			}
		case c == '/' && i+1 < len(sql) && sql[i+1] == '*':
			i = skipBlockComment(sql, i)
		case c == '\'':
			end := literalEnd(sql, i, false)
			if after {
				spans = append(spans, [2]int{i, end})
			}
			after = false
			i = end
		case c == '"':
			i = quotedEnd(sql, i, '"')
			after = false
		case c == '$':
			if j := i + 1; j < len(sql) && isDigit(sql[j]) {
				n := 0
				for j < len(sql) && isDigit(sql[j]) {
					if n < 1<<20 {
						n = n*10 + int(sql[j]-'0')
					}
					j++
				}
				if after {
					params = append(params, n)
				}
				after = false
				i = j
				continue
			}
			if end, ok := dollarQuoteEnd(sql, i); ok {
				if after {
					spans = append(spans, [2]int{i, end})
				}
				after = false
				i = end
				continue
			}
			after = false
			i++
		case isIdentStart(c):
			j := i
			for j < len(sql) && isIdentCont(sql[j]) {
				j++
			}
			word := sql[i:j]
			// Prefixed literals: E'…' (backslash escapes), B'…', X'…', N'…', U&'…'.
			if j < len(sql) && sql[j] == '\'' && len(word) == 1 && strings.ContainsRune("eEbBxXnN", rune(word[0])) {
				end := literalEnd(sql, j, word[0] == 'e' || word[0] == 'E')
				if after {
					spans = append(spans, [2]int{i, end})
				}
				after = false
				i = end
				continue
			}
			if (word == "u" || word == "U") && j+1 < len(sql) && sql[j] == '&' && sql[j+1] == '\'' {
				end := literalEnd(sql, j+1, false)
				if after {
					spans = append(spans, [2]int{i, end})
				}
				after = false
				i = end
				continue
			}
			after = strings.EqualFold(word, "password")
			i = j
		default:
			after = false
			i++
		}
	}
	if len(spans) == 0 {
		return sql, params
	}
	var b strings.Builder
	b.Grow(len(sql))
	last := 0
	for _, s := range spans {
		b.WriteString(sql[last:s[0]])
		b.WriteString("'" + redactedValue + "'")
		last = s[1]
	}
	b.WriteString(sql[last:])
	return b.String(), params
}

// literalEnd returns the index after the literal that opens at sql[i] == '\”.
// With escapes false it also computes where the literal would end if
// backslashes escaped (standard_conforming_strings off) and returns the later
// of the two ends. An unterminated literal runs to the end of the text.
func literalEnd(sql string, i int, escapes bool) int {
	std := len(sql)
	if !escapes {
		std = quotedEnd(sql, i, '\'')
	}
	// Backslash reading.
	j := i + 1
	for j < len(sql) {
		switch sql[j] {
		case '\\':
			j += 2
			continue
		case '\'':
			if j+1 < len(sql) && sql[j+1] == '\'' {
				j += 2
				continue
			}
			j++
			if escapes || j > std {
				return min(j, len(sql))
			}
			return std
		}
		j++
	}
	return len(sql)
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

// dollarQuoteEnd recognises $tag$…$tag$ at sql[i] and returns the index after it.
func dollarQuoteEnd(sql string, i int) (int, bool) {
	j := i + 1
	for j < len(sql) && sql[j] != '$' {
		if !isIdentCont(sql[j]) || sql[j] == '$' || (j == i+1 && isDigit(sql[j])) {
			return 0, false
		}
		j++
	}
	if j >= len(sql) {
		return 0, false
	}
	tag := sql[i : j+1]
	if k := strings.Index(sql[j+1:], tag); k >= 0 {
		return j + 1 + k + len(tag), true
	}
	return len(sql), true
}

func skipBlockComment(sql string, i int) int {
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

func isDigit(c byte) bool { return c >= '0' && c <= '9' }

func isIdentStart(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c == '_' || c >= 0x80
}

func isIdentCont(c byte) bool { return isIdentStart(c) || isDigit(c) || c == '$' }

// containsFoldASCII reports whether s contains the lower-case ASCII word,
// ignoring ASCII case, without allocating.
func containsFoldASCII(s, lower string) bool {
	n := len(lower)
outer:
	for i := 0; i+n <= len(s); i++ {
		for k := 0; k < n; k++ {
			c := s[i+k]
			if c >= 'A' && c <= 'Z' {
				c += 'a' - 'A'
			}
			if c != lower[k] {
				continue outer
			}
		}
		return true
	}
	return false
}
