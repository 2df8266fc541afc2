package exporter

import (
	"slices"
	"strings"
	"testing"
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
