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
		{"quoted identifier", `SELECT "password" 'x'`, `SELECT "password" 'x'`, nil},
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
