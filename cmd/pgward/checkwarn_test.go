package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pgward/pgward/testenv"
)

// TestCheckConfigWarnings: what the agent logs at WARN about its
// configuration when it starts, check-config prints as warnings (with the
// key's line) and still exits 0; a file without any prints none.
func TestCheckConfigWarnings(t *testing.T) {
	dir := t.TempDir()
	ca, err := testenv.NewCA()
	if err != nil {
		t.Fatal(err)
	}
	crt, key, err := ca.IssueClientValid("orders_rw", time.Now().Add(-time.Hour), time.Now().Add(24*time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	write := func(name, text string) string {
		t.Helper()
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	write("ca.pem", string(ca.CertPEM))
	write("client.crt", string(crt))
	write("client.key", string(key))
	write("secrets.yaml", "orders:\n  orders_rw: { password: x }\ncerts:\n  orders_rw: { cert_file: "+dir+"/client.crt, key_file: "+dir+"/client.key }\n")
	write("checkpoint.yaml", "audit:\n  orders_rw: { password: AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8= }\n")
	cfg := write("warn.yaml", `listen:
  max_message_size: 1048576
upstreams:
  orders: { address: /var/run/postgresql/.s.PGSQL.5432 }
  local:
    address: /var/run/postgresql/.s.PGSQL.5432
    auth: [trust]
  certs:
    address: db.internal:5432
    tls: { mode: verify-full, ca_file: `+dir+`/ca.pem }
    auth: [cert]
secrets: { file: { path: `+dir+`/secrets.yaml } }
principals:
  billing: { match: { uid: [1001] } }
grants:
  - { principal: billing, upstream: orders, roles: [orders_rw] }
  - { principal: billing, upstream: local, roles: [orders_rw] }
  - { principal: billing, upstream: certs, roles: [orders_rw] }
audit: { path: `+dir+`/audit.jsonl }
`)
	code, out, errs := runCLI("check-config", cfg)
	if code != exitOK || !strings.Contains(out, "dbname=local") {
		t.Fatalf("check-config with warnings: code %d, want %d\n%s\n%s", code, exitOK, out, errs)
	}
	for _, want := range []string{
		"warning: " + cfg + ":2: listen.max_message_size: is deprecated",
		"warning: " + cfg + ":7: upstreams.local.auth: lists trust: pgward accepts this server without any authentication",
		"warning: " + cfg + ":12: secrets.file: secrets file: client certificate expires soon (upstream=certs, role=orders_rw",
		"warning: " + cfg + ":19: audit.checkpoint.key: is not set, so audit checkpoints are off",
	} {
		if !strings.Contains(errs, want) {
			t.Errorf("check-config's stderr lacks %q:\n%s", want, errs)
		}
	}
	if n := strings.Count(errs, "warning: "); n != 4 {
		t.Errorf("%d warnings, want 4:\n%s", n, errs)
	}

	// The same file without what the agent warns about: no warning.
	clean := write("clean.yaml", `upstreams:
  orders: { address: /var/run/postgresql/.s.PGSQL.5432 }
secrets: { file: { path: `+dir+`/checkpoint.yaml } }
principals:
  billing: { match: { uid: [1001] } }
grants:
  - { principal: billing, upstream: orders, roles: [orders_rw] }
audit:
  path: `+dir+`/audit.jsonl
  checkpoint: { key: { upstream: audit, role: orders_rw } }
`)
	code, out, errs = runCLI("check-config", clean)
	if code != exitOK || strings.Contains(errs, "warning") {
		t.Errorf("check-config of a file with nothing to warn about: code %d\n%s\n%s", code, out, errs)
	}
}
