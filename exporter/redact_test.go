package exporter

import (
	"fmt"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestRedactSQL(t *testing.T) {
	const R = "'[REDACTED]'"
	tests := []struct {
		name, in, want string
		params         []int
	}{
		{"create role", "CREATE ROLE a LOGIN PASSWORD 'hunter2'", "CREATE ROLE a LOGIN PASSWORD " + R, nil},
		{"alter user encrypted", "alter user a with encrypted password 'it''s'", "alter user a with encrypted password " + R, nil},
		{"escape string", `ALTER ROLE a PASSWORD E'a\'b' VALID UNTIL 'infinity'`, "ALTER ROLE a PASSWORD " + R + " VALID UNTIL 'infinity'", nil},
		{"non-standard backslash", `ALTER ROLE a PASSWORD 'ab\'cd' LOGIN`, "ALTER ROLE a PASSWORD " + R + " LOGIN", nil},
		{"dollar quoted", "ALTER ROLE a PASSWORD $pw$x'y$pw$", "ALTER ROLE a PASSWORD " + R, nil},
		{"unicode escape", "ALTER ROLE a PASSWORD U&'d\\0061t'", "ALTER ROLE a PASSWORD " + R, nil},
		{"comment between", "ALTER ROLE a PASSWORD /* c */ 'x'", "ALTER ROLE a PASSWORD /* c */ " + R, nil},
		{"scram verifier", "ALTER USER a PASSWORD 'SCRAM-SHA-256$4096:c2FsdA==$a:b'", "ALTER USER a PASSWORD " + R, nil},
		{"parameter", "ALTER ROLE a PASSWORD $1", "ALTER ROLE a PASSWORD $1", []int{1}},
		{"second parameter", "CREATE USER u WITH LOGIN PASSWORD $2 VALID UNTIL $1", "CREATE USER u WITH LOGIN PASSWORD $2 VALID UNTIL $1", []int{2}},
		{"multi statement", "SELECT 1; CREATE USER u PASSWORD 'p'; SELECT 'q'", "SELECT 1; CREATE USER u PASSWORD " + R + "; SELECT 'q'", nil},
		{"two passwords", "CREATE USER a PASSWORD 'x';CREATE USER b PASSWORD 'y'", "CREATE USER a PASSWORD " + R + ";CREATE USER b PASSWORD " + R, nil},
		{"user mapping", "CREATE USER MAPPING FOR u SERVER s OPTIONS (user 'x', password 'secret')", "CREATE USER MAPPING FOR u SERVER s OPTIONS (user 'x', password " + R + ")", nil},
		{"unterminated", "ALTER ROLE a PASSWORD 'abc", "ALTER ROLE a PASSWORD " + R, nil},
		{"null password", "ALTER ROLE a PASSWORD NULL", "ALTER ROLE a PASSWORD NULL", nil},
		{"column named password", "SELECT password FROM users WHERE name = 'bob'", "SELECT password FROM users WHERE name = 'bob'", nil},
		{"literal password", "SELECT 'password', 'x'", "SELECT 'password', 'x'", nil},
		{"quoted identifier", `SELECT "Password" 'x', "password"`, `SELECT "Password" 'x', "password"`, nil},
		{"quoted password option", `CREATE USER MAPPING FOR u SERVER s OPTIONS ("user" 'x', "password" 'secret')`, `CREATE USER MAPPING FOR u SERVER s OPTIONS ("user" 'x', "password" ` + R + `)`, nil},
		{"password in quoted identifier", `SELECT "a PASSWORD 'x' b" FROM t`, `SELECT "a PASSWORD 'x' b" FROM t`, nil},

		// Issue 12 point 5: the forms PostgreSQL's lexer knows.
		{"continuation", "ALTER ROLE a PASSWORD 'abc'\n'def'", "ALTER ROLE a PASSWORD " + R, nil},
		{"continuation three parts", "ALTER ROLE a PASSWORD 'ab'\n  'cd'\r\n\t'ef' LOGIN", "ALTER ROLE a PASSWORD " + R + " LOGIN", nil},
		{"continuation over line comment", "ALTER ROLE a PASSWORD 'abc' -- first half\n-- more\n 'def' LOGIN", "ALTER ROLE a PASSWORD " + R + " LOGIN", nil},
		{"continuation of E string keeps escapes", "ALTER ROLE a PASSWORD E'ab'\n'c\\'d' LOGIN", "ALTER ROLE a PASSWORD " + R + " LOGIN", nil},
		{"continuation of U&", "ALTER ROLE a PASSWORD U&'ab'\n'\\0063d' LOGIN", "ALTER ROLE a PASSWORD " + R + " LOGIN", nil},
		{"continuation of B", "SELECT password B'01'\n'10' x", "SELECT password " + R + " x", nil},
		{"adjacent on one line", "ALTER ROLE a PASSWORD 'abc' 'def' LOGIN", "ALTER ROLE a PASSWORD " + R + " LOGIN", nil},
		{"adjacent behind block comment", "ALTER ROLE a PASSWORD 'abc' /* x */ E'def' LOGIN", "ALTER ROLE a PASSWORD " + R + " LOGIN", nil},
		{"escaped quote only", `ALTER ROLE a PASSWORD E'\'' LOGIN`, "ALTER ROLE a PASSWORD " + R + " LOGIN", nil},
		{"escaped backslash then quote", `ALTER ROLE a PASSWORD E'ab\\' LOGIN 'x'`, "ALTER ROLE a PASSWORD " + R + " LOGIN 'x'", nil},
		{"escape string lowercase", `alter role a password e'a\x41\101\u0041b' login`, "alter role a password " + R + " login", nil},
		{"escape string doubled quote", `ALTER ROLE a PASSWORD E'a''b\'''' LOGIN`, "ALTER ROLE a PASSWORD " + R + " LOGIN", nil},
		{"uescape backslash reads two ways", `ALTER ROLE a PASSWORD U&'a' UESCAPE '\' LOGIN`, "ALTER ROLE a PASSWORD " + R, nil},
		{"uescape", `ALTER ROLE a PASSWORD U&'\0041' UESCAPE '!' LOGIN`, "ALTER ROLE a PASSWORD " + R + " LOGIN", nil},
		{"uescape bang", `ALTER ROLE a PASSWORD u&'d!0061t!+000061' uescape /* c */ '!'`, "ALTER ROLE a PASSWORD " + R, nil},
		{"unicode doubled quote", `ALTER ROLE a PASSWORD U&'a''b' LOGIN`, "ALTER ROLE a PASSWORD " + R + " LOGIN", nil},
		{"national", `ALTER ROLE a PASSWORD N'secret' LOGIN`, "ALTER ROLE a PASSWORD " + R + " LOGIN", nil},
		{"empty dollar tag", "ALTER ROLE a PASSWORD $$it's$$ LOGIN", "ALTER ROLE a PASSWORD " + R + " LOGIN", nil},
		{"nested dollar quotes", "ALTER ROLE a PASSWORD $a$ $b$ inner $b$ $a$ LOGIN", "ALTER ROLE a PASSWORD " + R + " LOGIN", nil},
		{"dollar tag prefix inside", "ALTER ROLE a PASSWORD $ab$ x$a$b $ab$ LOGIN", "ALTER ROLE a PASSWORD " + R + " LOGIN", nil},
		{"dollar tag with digits", "ALTER ROLE a PASSWORD $t1$x$t1$ LOGIN", "ALTER ROLE a PASSWORD " + R + " LOGIN", nil},
		{"dollar in identifier is no quote", "SELECT a$b$ FROM t WHERE x = 'password' AND y$z$ = 1", "SELECT a$b$ FROM t WHERE x = 'password' AND y$z$ = 1", nil},
		{"dollar quote hides keyword", "SELECT $x$ PASSWORD 'y' $x$", "SELECT $x$ PASSWORD 'y' $x$", nil},
		{"parameter after comment", "ALTER ROLE a PASSWORD /* c */ $1", "ALTER ROLE a PASSWORD /* c */ $1", []int{1}},
		{"parameter twice", "ALTER ROLE a PASSWORD $1; ALTER ROLE b PASSWORD $1", "ALTER ROLE a PASSWORD $1; ALTER ROLE b PASSWORD $1", []int{1}},
		{"nested comment", "ALTER ROLE a PASSWORD /* a /* b */ 'not' */ 'secret' LOGIN", "ALTER ROLE a PASSWORD /* a /* b */ 'not' */ " + R + " LOGIN", nil},
		{"nested comment hides keyword", "/* a /* b */ PASSWORD */ SELECT 'x'", "/* a /* b */ PASSWORD */ SELECT 'x'", nil},
		{"line comment between", "ALTER ROLE a PASSWORD -- here it comes\n'secret'", "ALTER ROLE a PASSWORD -- here it comes\n" + R, nil},
		{"keyword case", "CREATE ROLE a WITH ENCRYPTED PaSsWoRd 'x'", "CREATE ROLE a WITH ENCRYPTED PaSsWoRd " + R, nil},
		{"create user with", "CREATE USER a WITH LOGIN PASSWORD 'x' CREATEDB", "CREATE USER a WITH LOGIN PASSWORD " + R + " CREATEDB", nil},
		{"several clauses in one statement", "CREATE ROLE a PASSWORD 'x' PASSWORD 'y'", "CREATE ROLE a PASSWORD " + R + " PASSWORD " + R, nil},
		{"alter user mapping set", "ALTER USER MAPPING FOR u SERVER s OPTIONS (SET password 'x', ADD PASSWORD E'y')", "ALTER USER MAPPING FOR u SERVER s OPTIONS (SET password " + R + ", ADD PASSWORD " + R + ")", nil},
		// standard_conforming_strings: both readings are redacted.
		{"backslash at end of plain literal", `SELECT 'C:\'; ALTER ROLE a PASSWORD 'secret'`, `SELECT 'C:\'; ALTER ROLE a PASSWORD ` + R, nil},
		{"non-standard reading only", `SELECT 'a\'; ALTER ROLE a PASSWORD ';' ALTER ROLE b PASSWORD 'secret'`, `SELECT 'a\'; ALTER ROLE a PASSWORD ` + R + ` ALTER ROLE b PASSWORD ` + R, nil},
		{"both readings overlap", `ALTER ROLE a PASSWORD 'ab\' 'cd' LOGIN`, `ALTER ROLE a PASSWORD ` + R + ` LOGIN`, nil},
		// Unterminated constructs run to the end of the text.
		{"unterminated E", `ALTER ROLE a PASSWORD E'abc\'`, "ALTER ROLE a PASSWORD " + R, nil},
		{"unterminated dollar", "ALTER ROLE a PASSWORD $q$abc", "ALTER ROLE a PASSWORD " + R, nil},
		{"unterminated continuation", "ALTER ROLE a PASSWORD 'abc'\n'def", "ALTER ROLE a PASSWORD " + R, nil},
		{"unterminated comment", "ALTER ROLE a PASSWORD /* 'x'", "ALTER ROLE a PASSWORD /* 'x'", nil},
		{"keyword at end", "ALTER ROLE a PASSWORD", "ALTER ROLE a PASSWORD", nil},
		{"in comment", "-- ALTER ROLE a PASSWORD 'x'\nSELECT 'y'", "-- ALTER ROLE a PASSWORD 'x'\nSELECT 'y'", nil},
		{"in dollar body", "DO $$BEGIN PERFORM 1; END$$; SELECT password 'x'", "DO $$BEGIN PERFORM 1; END$$; SELECT password " + R, nil},
		{"no password", "SELECT 1", "SELECT 1", nil},
		{"identifier suffix", "SELECT mypassword 'x'", "SELECT mypassword 'x'", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, params := redactSQL(tt.in)
			if got != tt.want || !slices.Equal(params, tt.params) {
				t.Errorf("redactSQL(%q)\n got %q %v\nwant %q %v", tt.in, got, params, tt.want, tt.params)
			}
		})
	}
}

func TestRedactSQLNoAlloc(t *testing.T) {
	q := "SELECT id, name FROM orders WHERE customer = $1 AND status = 'open'"
	if n := testing.AllocsPerRun(100, func() { redactSQL(q) }); n != 0 {
		t.Errorf("redactSQL allocates %v times for a statement without password", n)
	}
}

// FuzzRedactSQL checks that a secret written as any kind of literal after
// PASSWORD never survives, whatever surrounds it.
func FuzzRedactSQL(f *testing.F) {
	f.Add("CREATE ROLE r ", "s3cretXYZ", " LOGIN", uint8(0))
	f.Add("ALTER USER u WITH ENCRYPTED ", "p'a\\ss", "", uint8(1))
	f.Add("", "x$y$z", "; SELECT 1", uint8(2))
	f.Fuzz(func(t *testing.T, before, secret, after string, kind uint8) {
		if len(secret) < 4 || strings.Contains(before+" PASSWORD '[REDACTED]'"+after, secret) {
			return
		}
		// The text before must end at a token boundary outside any literal
		// or comment: require it to lex cleanly, by checking it alone has no
		// unclosed construct (a simple approximation: no quotes or comment marks).
		if strings.ContainsAny(before, "'\"$-/*\\") || strings.ContainsAny(after, "\x00") {
			return
		}
		var lit string
		switch kind % 3 {
		case 0:
			lit = "'" + strings.ReplaceAll(secret, "'", "''") + "'"
		case 1:
			lit = "E'" + strings.ReplaceAll(strings.ReplaceAll(secret, `\`, `\\`), "'", `\'`) + "'"
		case 2:
			if strings.Contains(secret, "$q$") {
				return
			}
			lit = "$q$" + secret + "$q$"
		}
		in := before + " PASSWORD " + lit + after
		got, _ := redactSQL(in)
		if strings.Contains(got, secret) {
			t.Fatalf("redactSQL(%q) = %q keeps the secret", in, got)
		}
	})
}

// benchStatement is a 1 KB statement: a role change with several options and
// literals around the password, or the same text with no password clause.
func benchStatement(password bool) string {
	var b strings.Builder
	b.WriteString("/* app: billing, request 4bf92f3577b34da6 */ ")
	for b.Len() < 900 {
		b.WriteString("SELECT id, name, 'it''s' AS note, $q$ body $q$ FROM orders WHERE customer = $1 AND status = 'open'; -- list\n")
	}
	if password {
		b.WriteString("ALTER ROLE billing WITH LOGIN PASSWORD 'correct horse'\n'battery staple' VALID UNTIL 'infinity'")
	} else {
		b.WriteString("ALTER ROLE billing WITH LOGIN CONNECTION LIMIT 10 VALID UNTIL 'infinity' -- no secret here")
	}
	return b.String()
}

func BenchmarkRedact(b *testing.B) {
	for _, tc := range []struct {
		name     string
		password bool
	}{{"1KB_no_password", false}, {"1KB_password", true}} {
		q := benchStatement(tc.password)
		b.Run(tc.name, func(b *testing.B) {
			b.SetBytes(int64(len(q)))
			b.ReportAllocs()
			for b.Loop() {
				redactSQL(q)
			}
		})
	}
}

// The literal forms FuzzRedactPasswordLiteral writes a password in: every
// string-constant form of the PostgreSQL manual's lexical-structure chapter
// (4.1.2).
const (
	formPlain           = iota // 'Dianne''s horse'
	formContinued              // 'foo' <whitespace with a newline> 'bar'
	formEscape                 // E'…' with \' \\ \b \f \n \r \t \o \oo \ooo \xh \xhh \uxxxx \Uxxxxxxxx and other bytes escaped
	formEscapeContinued        // E'foo' <newline> 'b\'ar': the continuation keeps the escapes
	formBackslash              // '…' with \' and \\, as standard_conforming_strings=off reads it
	formUnicode                // U&'d\0061t\+000061'
	formUescape                // U&'d!0061t!+000061' UESCAPE '!'
	formDollar                 // $$Dianne's horse$$
	formDollarTag              // $SomeTag$Dianne's horse$SomeTag$
	formDollarNested           // $function$ … $q$[\t\r\n\v\\]$q$ … $function$
	formNational               // N'…'
	formBits                   // B'1001'
	formHex                    // X'1FF'
	formCount
)

// continuationSeps separate the parts of a continued constant: whitespace
// with at least one newline, -- comments allowed.
var continuationSeps = []string{"\n", " \n", "\r\n", "\r", "\n\n\t  ", " -- first part\n", "\t-- a\n-- b\n  ", "\f\n\f"}

// encodeLiteral writes password as a literal of the given form; sel and split
// vary the escapes and where a continued constant is cut. ok is false when the
// form cannot hold that password.
func encodeLiteral(password string, form, sel, split uint8, tag string) (lit string, ok bool) {
	k := 0
	if len(password) > 0 {
		k = int(split) % (len(password) + 1)
	}
	sep := continuationSeps[int(sel)%len(continuationSeps)]
	switch form % formCount {
	case formPlain:
		return "'" + strings.ReplaceAll(password, "'", "''") + "'", true
	case formContinued:
		p1, p2 := password[:k], password[k:]
		return "'" + strings.ReplaceAll(p1, "'", "''") + "'" + sep + "'" + strings.ReplaceAll(p2, "'", "''") + "'", true
	case formEscape:
		return "E'" + escapeBody(password, sel) + "'", true
	case formEscapeContinued:
		return "E'" + escapeBody(password[:k], sel) + "'" + sep + "'" + escapeBody(password[k:], sel>>1) + "'", true
	case formBackslash:
		return "'" + strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(password) + "'", true
	case formUnicode:
		return "U&'" + unicodeBody(password, '\\', sel) + "'", true
	case formUescape:
		return "U&'" + unicodeBody(password, '!', sel) + "' UESCAPE '!'", true
	case formDollar:
		return dollarQuote(password, "")
	case formDollarTag:
		return dollarQuote(password, dollarTag(tag))
	case formDollarNested:
		t := dollarTag(tag)
		return dollarQuote(password[:k]+"$"+t+"_in$ "+t+" $"+t+"_in$"+password[k:], t)
	case formNational:
		return "N'" + strings.ReplaceAll(password, "'", "''") + "'", true
	case formBits, formHex:
		if strings.Contains(password, "'") {
			return "", false
		}
		return string("BX"[form%formCount-formBits]) + "'" + password + "'", true
	}
	panic("unreachable")
}

// escapeBody escapes s for E'…', choosing per byte among raw bytes, \ooo,
// \xhh, \uxxxx, \Uxxxxxxxx, single-letter escapes and \ before a byte that
// stands for itself.
func escapeBody(s string, sel uint8) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		how := 0
		if sel&1 != 0 {
			how = (int(sel>>1) + i) % 6
		}
		switch {
		case how == 1:
			fmt.Fprintf(&b, `\%03o`, c)
		case how == 2:
			fmt.Fprintf(&b, `\x%02x`, c)
		case how == 3 && c < 0x80:
			fmt.Fprintf(&b, `\u%04X`, c)
		case how == 4 && c < 0x80:
			fmt.Fprintf(&b, `\U%08x`, c)
		case how == 5 && strings.IndexByte("\b\f\n\r\t", c) >= 0:
			b.WriteByte('\\')
			b.WriteByte("bfnrt"[strings.IndexByte("\b\f\n\r\t", c)])
		case how == 5 && strings.IndexByte(`01234567xuUbfnrt`, c) < 0:
			b.WriteByte('\\')
			b.WriteByte(c)
		case c == '\\':
			b.WriteString(`\\`)
		case c == '\'' && i%2 == 0:
			b.WriteString(`\'`)
		case c == '\'':
			b.WriteString(`''`)
		default:
			b.WriteByte(c)
		}
	}
	return b.String()
}

// unicodeBody escapes s for U&'…' with escape character esc, writing ASCII
// bytes raw, as escXXXX or as esc+XXXXXX.
func unicodeBody(s string, esc byte, sel uint8) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch how := (int(sel) + i) % 3; {
		case c == '\'':
			b.WriteString("''")
		case c == esc:
			b.WriteByte(esc)
			b.WriteByte(esc)
		case c < 0x80 && how == 1:
			fmt.Fprintf(&b, "%c%04X", esc, c)
		case c < 0x80 && how == 2:
			fmt.Fprintf(&b, "%c+%06x", esc, c)
		default:
			b.WriteByte(c)
		}
	}
	return b.String()
}

// dollarTag makes a dollar-quote tag out of fuzz input: identifier bytes
// without $, not starting with a digit.
func dollarTag(s string) string {
	var b strings.Builder
	for i := 0; i < len(s) && b.Len() < 16; i++ {
		if c := s[i]; isIdentStart(c) || (b.Len() > 0 && isDigit(c)) {
			b.WriteByte(c)
		}
	}
	if b.Len() == 0 {
		return "SomeTag"
	}
	return b.String()
}

// dollarQuote quotes body with $tag$ when the tag's first repetition is the
// closing one.
func dollarQuote(body, tag string) (string, bool) {
	d := "$" + tag + "$"
	if strings.Index(body+d, d) != len(body) {
		return "", false
	}
	return d + body + d, true
}

// safeText keeps the bytes of fuzzed surrounding text that cannot open a
// literal, comment or quoted identifier, so the text before the password
// clause ends between tokens.
func safeText(s string) string {
	var b strings.Builder
	for i := 0; i < len(s) && b.Len() < 64; i++ {
		if c := s[i]; c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte(" \n\t_,;()=.", c) >= 0 {
			b.WriteByte(c)
		}
	}
	return b.String()
}

var (
	fuzzHeads = []string{
		"CREATE ROLE r WITH LOGIN ENCRYPTED", "create user u with", "ALTER ROLE r", `alter user "U" WITH`,
		"ALTER ROLE r WITH LOGIN", "CREATE GROUP g", "CREATE USER MAPPING FOR u SERVER s OPTIONS (user 'x',",
		"ALTER USER MAPPING FOR u SERVER s OPTIONS (SET",
	}
	fuzzKeywords = []string{"PASSWORD", "password", "Password", "pAsSwOrD"}
	fuzzGaps     = []string{" ", "\n", " /*x*/ ", "/* /* n */ */", " -- c\n", "\t\r\n", ""}
	fuzzBefore   = []string{
		"", "SELECT 1;", `SELECT 'it''s', E'a\'b', $q$ x $q$;`, "/* c /* n */ */", "-- c\n",
		`SELECT "col""x" FROM t;`, "SELECT $1, a$b$;", `SELECT U&'\0041' UESCAPE '\';`, `SELECT 'C:\';`,
		"SELECT B'01', X'1F';", "BEGIN;\n", "SELECT 'a'\n'b';",
	}
	fuzzTails = []string{"", " LOGIN", " VALID UNTIL 'infinity'", ")", "; SELECT 1", "\n;SELECT $$x$$", " -- end", " /* end */", ";\nSELECT 'a\\'", " UESCAPE"}
)

// FuzzRedactPasswordLiteral checks that no byte of a password literal
// survives redaction, whatever form the literal takes and whatever surrounds
// it: the output is the text before the literal, '[REDACTED]' where the
// literal was, and then only text from after the literal (some of which may be
// redacted as well).
func FuzzRedactPasswordLiteral(f *testing.F) {
	// The manual's examples (4.1.2), each in its form.
	f.Add("Dianne's horse", uint8(formPlain), uint8(0), uint8(0), uint32(0), "", "")
	f.Add("This is a string", uint8(formPlain), uint8(0), uint8(0), uint32(1), "", "")
	f.Add("foobar", uint8(formContinued), uint8(0), uint8(3), uint32(2), "", "")
	f.Add("foo--bar", uint8(formContinued), uint8(5), uint8(3), uint32(3), "", "x")
	f.Add("b\f\n\r\t'\\AAA", uint8(formEscape), uint8(0x0b), uint8(0), uint32(4), "", "") // \b \f \n \r \t, \o \oo \ooo, \xh \xhh
	f.Add("AAAAAAAAAAAA", uint8(formEscape), uint8(0x07), uint8(0), uint32(5), "", "")    // \uxxxx and \Uxxxxxxxx
	f.Add("it's\\fine", uint8(formEscape), uint8(0), uint8(0), uint32(6), "", "")         // \' and \\
	f.Add("ab'cd\\ef", uint8(formEscapeContinued), uint8(2), uint8(3), uint32(7), "", "") // E'ab\'' newline 'cd\\ef'
	f.Add("C:\\dir\\'x'", uint8(formBackslash), uint8(0), uint8(0), uint32(8), "", "")    // standard_conforming_strings off
	f.Add("data data", uint8(formUnicode), uint8(1), uint8(0), uint32(9), "", "")         // U&'d\0061t\+000061'
	f.Add("data!data", uint8(formUescape), uint8(1), uint8(0), uint32(10), "", "")        // U&'d!0061t!+000061' UESCAPE '!'
	f.Add("Dianne's horse", uint8(formDollar), uint8(0), uint8(0), uint32(11), "", "")    // $$Dianne's horse$$
	f.Add("Dianne's horse", uint8(formDollarTag), uint8(0), uint8(0), uint32(12), "SomeTag", "")
	f.Add(" BEGIN RETURN ($1 ~ $q$[\\t\\r\\n\\v\\\\]$q$); END; ", uint8(formDollarTag), uint8(0), uint8(0), uint32(13), "function", "")
	f.Add("outer inner", uint8(formDollarNested), uint8(0), uint8(6), uint32(14), "a", "")
	f.Add("national", uint8(formNational), uint8(0), uint8(0), uint32(15), "", "")
	f.Add("10011001", uint8(formBits), uint8(0), uint8(0), uint32(16), "", "")
	f.Add("1FF1FF", uint8(formHex), uint8(0), uint8(0), uint32(17), "", "")
	f.Add("s3cret'\n'x", uint8(formPlain), uint8(0), uint8(0), uint32(0xffffffff), "", "more text; SELECT")
	f.Fuzz(func(t *testing.T, password string, form, sel, split uint8, shape uint32, tag, text string) {
		const marker = "'" + redactedValue + "'"
		if len(password) < 6 {
			return
		}
		lit, ok := encodeLiteral(password, form, sel, split, tag)
		if !ok {
			return
		}
		pick := func(list []string, bits uint) string { return list[int(shape>>bits)%len(list)] }
		gap := pick(fuzzGaps, 8)
		if gap == "" && lit[0] != '\'' {
			gap = " " // PASSWORD$$…$$ or PASSWORDE'…' would be one identifier
		}
		free := safeText(text)
		if form%formCount == formBackslash && (strings.Contains(pick(fuzzBefore, 0)+pick(fuzzBefore, 4), `\';`)) {
			// That text means one thing only with standard_conforming_strings
			// on, this literal only with it off: no server reads both.
			return
		}
		before := pick(fuzzBefore, 0) + " " + pick(fuzzBefore, 4) + " " + free + " " + pick(fuzzHeads, 12) + " " + pick(fuzzKeywords, 16) + gap
		tail := pick(fuzzTails, 20)
		if shape&(1<<28) != 0 {
			tail += " " + free
		}
		if containsFoldASCII(before[:len(before)-len(gap)-len("password")], "password") || containsFoldASCII(tail, "password") ||
			strings.Contains(before+marker+tail, password) || strings.Contains(tail, redactedValue) {
			return
		}
		in := before + lit + tail
		got, _ := redactSQL(in)
		if strings.Contains(got, password) {
			t.Fatalf("redactSQL(%q)\n= %q\nkeeps the password %q", in, got, password)
		}
		rest, ok := strings.CutPrefix(got, before+marker)
		if !ok {
			t.Fatalf("redactSQL(%q)\n= %q\ndoes not replace the literal %q where it starts", in, got, lit)
		}
		if !fromTail(rest, tail, marker) {
			t.Fatalf("redactSQL(%q)\n= %q\nleaves part of the literal %q: %q is not what follows it", in, got, lit, rest)
		}
	})
}

// fromTail reports whether rest is tail with some parts of it replaced by
// marker: every byte outside a marker comes, in order, from tail, and rest
// ends where tail ends.
func fromTail(rest, tail, marker string) bool {
	pieces := strings.Split(rest, marker)
	j := 0
	for k, p := range pieces {
		if k == len(pieces)-1 {
			return strings.HasSuffix(tail[j:], p)
		}
		x := strings.Index(tail[j:], p)
		if x < 0 {
			return false
		}
		j += x + len(p)
	}
	return true
}

func TestContainsFoldASCII(t *testing.T) {
	for _, s := range []string{"", "p", "password", "PASSWORD", "xPaSsWoRd", "passwor", "ppassword", "PpPpassword",
		"pasPassword", "a p b P c passwor d", "Password\x00", "pässword", strings.Repeat("pP", 50) + "assword"} {
		want := strings.Contains(strings.ToLower(s), "password") && !strings.Contains(s, "ä")
		if got := containsFoldASCII(s, "password"); got != want {
			t.Errorf("containsFoldASCII(%q) = %v, want %v", s, got, want)
		}
	}
}

// TestRedactSQLLinear feeds long adversarial statements (long chains of
// adjacent literals after PASSWORD, unclosed dollar quotes, deep comments,
// many keywords) and checks the time grows with the length, not its square:
// 16 times the text may take at most 100 times as long (quadratic would be
// 256), with slack for the race detector. The time is the thread's CPU
// time, not the wall clock: on a loaded machine a 1 ms run fits in one
// time slice while a 20 ms one shares the core with everything else, and
// wall time gave 300 times for 16 times the text (1.2 ms, 352 ms) in a
// -race run of the package beside a CPU hog.
func TestRedactSQLLinear(t *testing.T) {
	if testing.Short() {
		t.Skip("timing test")
	}
	units := map[string]string{
		"adjacent literals":   "'ab' ",
		"continuations":       "'ab'\n",
		"unclosed dollar":     "$a$ ",
		"nested comments":     "/* ",
		"keywords":            "PASSWORD ",
		"keyword and literal": "PASSWORD 'x' ",
		"backslashes":         `'\'`,
		"first letters":       "pPpPpass",
	}
	threadCPU := func() time.Duration {
		var ts unix.Timespec
		if err := unix.ClockGettime(unix.CLOCK_THREAD_CPUTIME_ID, &ts); err != nil {
			t.Fatal(err)
		}
		return time.Duration(ts.Nano())
	}
	elapsed := func(q string) time.Duration {
		runtime.LockOSThread() // the thread whose CPU time is read
		defer runtime.UnlockOSThread()
		best := time.Duration(1<<63 - 1)
		for range 5 {
			runtime.GC()
			t0 := threadCPU()
			redactSQL(q)
			best = min(best, threadCPU()-t0)
		}
		return best
	}
	for name, u := range units {
		small := "ALTER ROLE r PASSWORD " + strings.Repeat(u, 32<<10/len(u))
		large := "ALTER ROLE r PASSWORD " + strings.Repeat(u, 512<<10/len(u))
		ts, tl := elapsed(small), elapsed(large)
		t.Logf("%s: 32 KB in %v, 512 KB in %v (%.0f×)", name, ts, tl, float64(tl)/float64(max(ts, 1)))
		if tl > 100*ts && tl > 250*time.Millisecond {
			t.Errorf("%s: 32 KB in %v, 512 KB in %v", name, ts, tl)
		}
	}
}
