package broker

import "strings"

// roleChange reports whether a statement text changes the role the
// session's statements run as, read lexically:
//
//   - a statement starting SET [SESSION|LOCAL] ROLE, SET [SESSION|LOCAL]
//     SESSION AUTHORIZATION, RESET ROLE, RESET SESSION AUTHORIZATION or
//     DISCARD ALL (which resets both), the name also as "role";
//   - a CREATE or ALTER (of a function or procedure) with a SET ROLE clause;
//   - a call of set_config whose first argument is the literal 'role' or
//     'session_authorization' in any case, or is anything but a plain
//     literal (an expression, a parameter, a named argument): those might
//     be either, so they are flagged too.
//
// Comments (nested /* */ too), quoted identifiers and every kind of string
// literal are read as PostgreSQL's lexer reads them, so a comment cannot
// hide the words and a literal cannot fake them. What runs inside a
// function body or dynamic SQL (EXECUTE in PL/pgSQL) is not seen: those
// are string literals here.
func roleChange(text string) bool {
	if !mayChangeRole(text) {
		return false
	}
	toks := lexSQL(text)
	start := 0
	for i := 0; i <= len(toks); i++ {
		if i < len(toks) && !(toks[i].kind == tokPunct && toks[i].text == ";") {
			continue
		}
		if stmtChangesRole(toks[start:i]) {
			return true
		}
		start = i + 1
	}
	return false
}

// mayChangeRole is a quick test that rules out most statements: every form
// roleChange flags contains one of these words (in a quoted identifier or
// a Unicode-escaped one it may be spelt otherwise: those texts pass).
func mayChangeRole(text string) bool {
	for i := 0; i+1 < len(text); i++ {
		// The second letter rules out most candidates before a compare.
		switch c, d := text[i]|0x20, text[i+1]|0x20; {
		case c == 'r' && d == 'o':
			if hasFoldAt(text, i, "role") {
				return true
			}
		case c == 'a' && d == 'u':
			if hasFoldAt(text, i, "authorization") {
				return true
			}
		case c == 's' && d == 'e':
			if hasFoldAt(text, i, "set_config") {
				return true
			}
		case c == 'd' && d == 'i':
			if hasFoldAt(text, i, "discard") {
				return true
			}
		case c == 'u' && text[i+1] == '&':
			return true
		}
	}
	return false
}

func hasFoldAt(s string, i int, word string) bool {
	return len(s)-i >= len(word) && strings.EqualFold(s[i:i+len(word)], word)
}

func stmtChangesRole(toks []sqlToken) bool {
	word := func(i int, w string) bool {
		return i < len(toks) && toks[i].kind == tokWord && toks[i].text == w
	}
	if len(toks) == 0 {
		return false
	}
	switch {
	case word(0, "set"):
		i := 1
		if word(i, "session") && (word(i+1, "role") || word(i+1, "session")) || word(i, "local") {
			i++
		}
		if word(i, "role") || word(i, "session") && word(i+1, "authorization") || word(i, "session_authorization") {
			return true
		}
	case word(0, "reset"):
		if word(1, "role") || word(1, "session") && word(1+1, "authorization") || word(1, "session_authorization") {
			return true
		}
	case word(0, "discard"):
		if word(1, "all") {
			return true
		}
	case word(0, "create"), word(0, "alter"):
		for i := range toks {
			if word(i, "set") && (word(i+1, "role") || word(i+1, "session_authorization")) {
				return true
			}
		}
	}
	for i := range toks {
		if !word(i, "set_config") || i+1 >= len(toks) || toks[i+1].text != "(" || toks[i+1].kind != tokPunct {
			continue
		}
		j := i + 2
		if j >= len(toks) || toks[j].kind != tokString || toks[j].unsure {
			return true // not a plain literal: it may name the role
		}
		name := strings.ToLower(toks[j].text)
		if name == "role" || name == "session_authorization" {
			return true
		}
		// 'x'::text is still x; anything else (||, a function) may not be.
		k := j + 1
		if k+1 < len(toks) && toks[k].text == "::" {
			k += 2
		}
		if k >= len(toks) || toks[k].text != "," {
			return true
		}
	}
	return false
}

type tokKind uint8

const (
	tokWord   tokKind = iota + 1 // keyword or identifier, lower-cased (quoted ones too: GUC names fold)
	tokString                    // a string literal's value (adjacent literals joined)
	tokPunct                     // operator or punctuation
	tokOther                     // numbers, parameters
)

type sqlToken struct {
	kind tokKind
	text string
	// unsure: a literal whose value pgward does not decode (escapes in E''
	// or U&'' strings): it could be anything.
	unsure bool
}

// lexSQL splits text into tokens as PostgreSQL's scanner does, closely
// enough for roleChange: comments dropped, literals and quoted identifiers
// decoded, words lower-cased.
func lexSQL(s string) []sqlToken {
	var toks []sqlToken
	i := 0
	// lastString: the index of the previous token when it is a string
	// literal followed by whitespace with a newline (continuation).
	cont := -1
	for i < len(s) {
		c := s[i]
		switch {
		case c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f':
			if c == '\n' && len(toks) > 0 && toks[len(toks)-1].kind == tokString {
				cont = len(toks) - 1
			}
			i++
			continue
		case c == '-' && i+1 < len(s) && s[i+1] == '-':
			for i < len(s) && s[i] != '\n' {
				i++
			}
			continue
		case c == '/' && i+1 < len(s) && s[i+1] == '*':
			depth := 0
			for i < len(s) {
				if s[i] == '/' && i+1 < len(s) && s[i+1] == '*' {
					depth++
					i += 2
				} else if s[i] == '*' && i+1 < len(s) && s[i+1] == '/' {
					depth--
					i += 2
					if depth == 0 {
						break
					}
				} else {
					i++
				}
			}
			continue
		}
		var t sqlToken
		switch {
		case c == '\'' || (c|0x20 == 'e' || c|0x20 == 'b' || c|0x20 == 'x' || c|0x20 == 'n') && i+1 < len(s) && s[i+1] == '\'':
			esc := c|0x20 == 'e'
			if c != '\'' {
				i++
			}
			v, n, unsure := quoted(s[i:], '\'', esc)
			t, i = sqlToken{kind: tokString, text: v, unsure: unsure}, i+n
		case (c|0x20 == 'u') && i+2 < len(s) && s[i+1] == '&' && (s[i+2] == '\'' || s[i+2] == '"'):
			q := s[i+2]
			v, n, _ := quoted(s[i+2:], q, false)
			i += 2 + n
			if q == '\'' {
				t = sqlToken{kind: tokString, text: v, unsure: true}
			} else {
				t = sqlToken{kind: tokWord, text: strings.ToLower(v)}
			}
			// UESCAPE 'c' follows optionally; it is just more tokens.
		case c == '"':
			v, n, _ := quoted(s[i:], '"', false)
			t, i = sqlToken{kind: tokWord, text: strings.ToLower(v)}, i+n
		case c == '$' && i+1 < len(s) && (s[i+1] == '$' || isIdentStart(s[i+1])):
			// Dollar quote $tag$…$tag$, or a parameter $1 (digits: not here).
			j := i + 1
			for j < len(s) && s[j] != '$' && isIdentCont(s[j]) {
				j++
			}
			if j < len(s) && s[j] == '$' {
				tag := s[i : j+1]
				end := strings.Index(s[j+1:], tag)
				if end < 0 {
					t, i = sqlToken{kind: tokString, text: s[j+1:]}, len(s)
				} else {
					t, i = sqlToken{kind: tokString, text: s[j+1 : j+1+end]}, j+1+end+len(tag)
				}
			} else {
				t, i = sqlToken{kind: tokOther, text: s[i:j]}, j
			}
		case isIdentStart(c):
			j := i
			for j < len(s) && isIdentCont(s[j]) {
				j++
			}
			t, i = sqlToken{kind: tokWord, text: strings.ToLower(s[i:j])}, j
		case c >= '0' && c <= '9' || c == '$':
			j := i + 1
			for j < len(s) && (isIdentCont(s[j]) || s[j] == '.') {
				j++
			}
			t, i = sqlToken{kind: tokOther, text: s[i:j]}, j
		case c == ':' && i+1 < len(s) && s[i+1] == ':':
			t, i = sqlToken{kind: tokPunct, text: "::"}, i+2
		default:
			t, i = sqlToken{kind: tokPunct, text: s[i : i+1]}, i+1
		}
		if t.kind == tokString && cont == len(toks)-1 && cont >= 0 {
			// 'ab'<newline>'cd' is one literal, 'abcd'.
			prev := &toks[cont]
			prev.text += t.text
			prev.unsure = prev.unsure || t.unsure
			cont = -1
			continue
		}
		cont = -1
		toks = append(toks, t)
	}
	return toks
}

// quoted decodes a literal or quoted identifier starting at s[0] == q:
// the doubled quote stands for one; with esc, a backslash escapes the next
// byte (the value is then marked unsure: \x41 and the like are not decoded).
// It returns the value and the bytes consumed.
func quoted(s string, q byte, esc bool) (string, int, bool) {
	var b strings.Builder
	unsure := false
	i := 1
	for i < len(s) {
		c := s[i]
		switch {
		case esc && c == '\\' && i+1 < len(s):
			unsure = true
			b.WriteByte(s[i+1])
			i += 2
			continue
		case c == q && i+1 < len(s) && s[i+1] == q:
			b.WriteByte(q)
			i += 2
			continue
		case c == q:
			return b.String(), i + 1, unsure
		}
		b.WriteByte(c)
		i++
	}
	return b.String(), i, true
}
