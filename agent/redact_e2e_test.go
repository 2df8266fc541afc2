package agent

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgward/pgward/broker"
	"github.com/pgward/pgward/testenv"
)

// A password changed through pgward in any literal form PostgreSQL's lexer
// knows is really set (logging in directly with it works), and no part of it
// reaches the audit file or pgward's log.
func TestPasswordLiteralFormsRedactedEndToEnd(t *testing.T) {
	const (
		admin   = "redact_admin"
		adminPW = "redact-admin-pass"
		target  = "redact_target"
	)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	pg := testenv.SharedPostgres(t)
	// The target holds CONNECT on the database: DROP OWNED BY revokes it
	// first, or DROP ROLE refuses (2BP01) and a second run (-count=2) on
	// the same server fails at its start.
	dropRoles := fmt.Sprintf(`DO $$ BEGIN
		IF EXISTS (SELECT FROM pg_roles WHERE rolname = '%[1]s') THEN DROP OWNED BY %[1]s; END IF;
		IF EXISTS (SELECT FROM pg_roles WHERE rolname = '%[2]s') THEN DROP OWNED BY %[2]s; END IF;
	END $$; DROP ROLE IF EXISTS %[1]s; DROP ROLE IF EXISTS %[2]s`, target, admin)
	if err := pg.Exec(ctx, dropRoles+fmt.Sprintf(`;
		CREATE ROLE %[1]s LOGIN CREATEROLE PASSWORD '%[3]s'; CREATE ROLE %[2]s LOGIN;
		GRANT CONNECT ON DATABASE %[4]s TO %[2]s`, admin, target, adminPW, testenv.Database)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := pg.Exec(context.Background(), dropRoles); err != nil {
			t.Errorf("dropping the test's roles: %v", err)
		}
	})
	h := newHarness(t, func(h *harness, c *Config) {
		f, err := os.OpenFile(filepath.Join(h.dir, "secrets.yaml"), os.O_APPEND|os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if _, err := fmt.Fprintf(f, "redact:\n  %s: { password: %s }\n", admin, adminPW); err != nil {
			t.Fatal(err)
		}
		c.Upstreams["redact"] = broker.UpstreamConfig{Address: pg.SocketPath(), Database: testenv.Database}
		c.Grants = append(c.Grants, broker.Grant{Principal: "me", Upstream: "redact", Roles: []string{admin}})
	})
	c := h.connect(t, admin, "redact")

	// Each statement sets a password the server assembles from the literal;
	// secrets are the fragments of the statement text that must not be
	// audited or logged (distinctive: upper case, not hex).
	tests := []struct {
		name     string
		literal  string
		password string
		secrets  []string
		wrong    string // a password that must not work, when the form is a concatenation
		before   string // statements sent in the same Query, before the ALTER ROLE
	}{
		{"continuation", "'KqZcontA'\n'WxYcontB'", "KqZcontAWxYcontB", []string{"KqZcontA", "WxYcontB"}, "KqZcontA", ""},
		{"continuation over a comment", "'CmQpartOne' -- second half follows\n  'CmQpartTwo'", "CmQpartOneCmQpartTwo", []string{"CmQpartOne", "CmQpartTwo"}, "CmQpartOne", ""},
		{"escape string", `E'EsKq\'ZwQu\\VvNp'`, `EsKq'ZwQu\VvNp`, []string{"EsKq", "ZwQu", "VvNp"}, "", ""},
		{"escape string continued", "E'EcRt\\''\n'PqZw\\\\Lm'", `EcRt'PqZw\Lm`, []string{"EcRt", "PqZw", "Lm'"}, "EcRt'", ""},
		{"unicode with uescape", `U&'UqW!0041!+00004BZy' UESCAPE '!'`, "UqWAKZy", []string{"UqW", "00004BZy"}, "", ""},
		{"dollar quoted", "$$DqNoTagZ'x$$", "DqNoTagZ'x", []string{"DqNoTagZ"}, "", ""},
		{"dollar quoted with tag and nested quote", "$pw$DqTgHk $in$ QzNest $in$ Jw$pw$", "DqTgHk $in$ QzNest $in$ Jw", []string{"DqTgHk", "QzNest"}, "", ""},
		{"comment before literal, lower case", "/* new one */ 'LcPwKeyZq'", "LcPwKeyZq", []string{"LcPwKeyZq"}, "", ""},
		// With standard_conforming_strings on (the default), 'C:\' ends at
		// its second quote; read the other way it would run on.
		{"after a literal ending in a backslash", "'BsAfterZq'", "BsAfterZq", []string{"BsAfter"}, "", `SELECT 'C:\'; `},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			keyword := "PASSWORD"
			if i%2 == 1 {
				keyword = "password"
			}
			sql := fmt.Sprintf("%sALTER ROLE %s WITH LOGIN %s %s", tt.before, target, keyword, tt.literal)
			if i%2 == 0 || tt.before != "" {
				// simple Query
				if _, err := c.PgConn().Exec(ctx, sql).ReadAll(); err != nil {
					t.Fatalf("%q through pgward: %v", sql, err)
				}
			} else if _, err := c.Exec(ctx, sql); err != nil { // Parse, Bind, Execute
				t.Fatalf("%q through pgward: %v", sql, err)
			}
			direct, err := pgx.Connect(ctx, pg.DSN(target, tt.password, testenv.Database))
			if err != nil {
				t.Fatalf("log in directly with %q (what the literal means): %v", tt.password, err)
			}
			direct.Close(ctx)
			if tt.wrong != "" {
				if direct, err := pgx.Connect(ctx, pg.DSN(target, tt.wrong, testenv.Database)); err == nil {
					direct.Close(ctx)
					t.Fatalf("log in with %q, the first part alone, succeeded", tt.wrong)
				}
			}
		})
	}
	// Two literals on one line are no continuation: a syntax error, whose
	// message quotes the second one. Neither may be audited.
	bad := fmt.Sprintf("ALTER ROLE %s PASSWORD 'OneLineQa' 'OneLineZb'", target)
	if _, err := c.PgConn().Exec(ctx, bad).ReadAll(); err == nil {
		t.Fatalf("%q succeeded", bad)
	}
	c.Close(ctx)
	h.stop()
	tests = append(tests, struct {
		name, literal, password string
		secrets                 []string
		wrong, before           string
	}{name: "syntax error", password: "OneLineQaOneLineZb", secrets: []string{"OneLineQa", "OneLineZb"}})

	audit := readFile(t, h.auditPath)
	logs := h.logs.String()
	for _, tt := range tests {
		for _, s := range append(tt.secrets, tt.password) {
			if strings.Contains(audit, s) {
				t.Errorf("%s: %q is in the audit file", tt.name, s)
			}
			if strings.Contains(logs, s) {
				t.Errorf("%s: %q is in pgward's log", tt.name, s)
			}
		}
	}
	// The statements were audited, redacted.
	n := 0
	for _, ev := range h.auditEvents(t) {
		if q := asString(ev["db_query"]); ev["event"] == "db.session.query" && strings.Contains(q, target) {
			n++
			if !strings.HasSuffix(q, "'[REDACTED]'") {
				t.Errorf("audited as %q", q)
			}
		}
	}
	syntaxErrors := 0
	for _, ev := range h.auditEvents(t) {
		if ev["event"] == "db.session.query.result" && ev["sqlstate"] == "42601" {
			syntaxErrors++
		}
	}
	if syntaxErrors != 1 {
		t.Errorf("%d results with SQLSTATE 42601 audited, want 1", syntaxErrors)
	}
	if n != len(tests) {
		t.Errorf("%d statements audited, want %d", n, len(tests))
	}
}
