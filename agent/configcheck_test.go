package agent

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pgward/pgward/testenv"
)

// checkFixture writes a configuration whose files (secrets, CA, audit
// directory) exist and are right, so that each case breaks one thing.
func checkFixture(t *testing.T) (dir string, cfg func(extra string) string) {
	t.Helper()
	dir = t.TempDir()
	os.WriteFile(filepath.Join(dir, "secrets.yaml"), []byte("orders:\n  orders_rw: { password: x }\n"), 0o600)
	os.Mkdir(filepath.Join(dir, "log"), 0o750)
	return dir, func(extra string) string {
		return strings.ReplaceAll(`listen: { unix_dir: DIR/run }
upstreams:
  orders: { address: /var/run/postgresql/.s.PGSQL.5432 }
secrets: { file: { path: DIR/secrets.yaml } }
principals:
  billing: { match: { uid: [1001] } }
grants:
  - { principal: billing, upstream: orders, roles: [orders_rw] }
audit: { path: DIR/log/audit.jsonl }
metrics: { listen: "127.0.0.1:9187" }
`+extra, "DIR", dir)
	}
}

// check-config reports every problem at once, each with file:line, the key
// path and what is expected, and everything the agent refuses at start.
func TestCheckConfigEveryProblem(t *testing.T) {
	dir, base := checkFixture(t)
	write := func(text string) string {
		p := filepath.Join(dir, "pgward.yaml")
		os.WriteFile(p, []byte(text), 0o644)
		return p
	}
	if _, err := CheckConfig(write(base(""))); err != nil {
		t.Fatalf("good configuration refused:\n%v", err)
	}
	tests := []struct {
		name  string
		text  string
		setup func()
		want  []string
	}{
		{"typo with suggestion", strings.Replace(base(""), "listen: { unix_dir: "+dir+"/run }", "listen:\n  unix_dir: "+dir+"/run\n  max_conections: 5", 1),
			nil, []string{"pgward.yaml:3: listen.max_conections: unknown key; did you mean max_connections?"}},
		{"duration", base("shutdown: { grace: 5 }\n"), nil,
			[]string{"pgward.yaml:11: shutdown.grace: want a duration such as 30s, not \"5\""}},
		{"number", base("limits: { auth_burst: lots }\n"), nil,
			[]string{"limits.auth_burst: want a whole number, not \"lots\""}},
		{"duplicate does not hide unknown", base("ebpf:\n  enabled: auto\n  enabled: false\n  enforc: true\n"), nil,
			[]string{"pgward.yaml:13: ebpf.enabled: duplicate key (first at line 12)", "pgward.yaml:14: ebpf.enforc: unknown key; did you mean enforce?"}},
		{"reading problems do not hide policy", strings.Replace(base("shutdown: { grace: soon }\n"), "grants:\n", "grants:\n  - { principal: ghost, upstream: orders, roles: [r] }\n", 1), nil,
			[]string{"shutdown.grace: want a duration", "grants[0].principal"}},
		{"secrets file mode 0644", base(""), func() { os.Chmod(filepath.Join(dir, "secrets.yaml"), 0o644) },
			[]string{"pgward.yaml:4: secrets.file.path:", "mode 0644"}},
		{"secrets file missing", strings.Replace(base(""), "secrets.yaml", "nosuch.yaml", 1), nil,
			[]string{"pgward.yaml:4: secrets.file.path:", "no such file"}},
		{"CA file missing", strings.Replace(base(""), "{ address: /var/run/postgresql/.s.PGSQL.5432 }", "{ address: db:5432, tls: { mode: verify-full, ca_file: "+dir+"/ca.pem } }", 1), nil,
			[]string{"pgward.yaml:3: upstreams.orders.tls.ca_file: cannot read it", "no such file"}},
		{"audit directory missing", strings.Replace(base(""), "log/audit.jsonl", "nolog/audit.jsonl", 1), nil,
			[]string{"pgward.yaml:9: audit.path: directory " + dir + "/nolog does not exist"}},
		{"metrics port", strings.Replace(base(""), "127.0.0.1:9187", "127.0.0.1:9187x", 1), nil,
			[]string{`pgward.yaml:10: metrics.listen: want host:port such as 127.0.0.1:9187, not "127.0.0.1:9187x"`}},
		{"all at once", strings.Replace(strings.Replace(base("shutdown: { grace: 5 }\n"), "127.0.0.1:9187", "127.0.0.1:9187x", 1), "log/audit", "nolog/audit", 1),
			func() { os.Chmod(filepath.Join(dir, "secrets.yaml"), 0o644) },
			[]string{"shutdown.grace", "metrics.listen", "audit.path", "secrets.file.path"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			os.Chmod(filepath.Join(dir, "secrets.yaml"), 0o600)
			if tt.setup != nil {
				tt.setup()
			}
			_, err := CheckConfig(write(tt.text))
			if err == nil {
				t.Fatal("accepted")
			}
			msg := err.Error()
			for _, w := range tt.want {
				if !strings.Contains(msg, w) {
					t.Errorf("missing %q in:\n%s", w, msg)
				}
			}
			for _, bad := range []string{"broker.", "time.Duration", "not found in type", "!!int", "cannot unmarshal"} {
				if strings.Contains(msg, bad) {
					t.Errorf("message names Go internals (%q):\n%s", bad, msg)
				}
			}
		})
	}
}

// An audit checkpoint key the secrets backend does not hold stops the
// agent at start, so check-config says so.
func TestCheckConfigCheckpointKey(t *testing.T) {
	dir, base := checkFixture(t)
	p := filepath.Join(dir, "pgward.yaml")
	os.WriteFile(p, []byte(strings.Replace(base(""), "audit: { path: "+dir+"/log/audit.jsonl }",
		"audit:\n  path: "+dir+"/log/audit.jsonl\n  checkpoint: { key: { backend: file, upstream: pgward, role: audit_checkpoint } }", 1)), 0o644)
	_, err := CheckConfig(p)
	if err == nil || !strings.Contains(err.Error(), "audit.checkpoint.key") {
		t.Fatalf("missing checkpoint key: %v", err)
	}
}

// upstreams.<name>.auth with cert and trust: check-config names the key
// and says what is needed.
func TestCheckConfigCertTrust(t *testing.T) {
	dir, base := checkFixture(t)
	os.WriteFile(filepath.Join(dir, "ca.pem"), []byte(testCAPEM(t)), 0o644)
	tcp := func(extra string) string {
		return strings.Replace(base(""), "{ address: /var/run/postgresql/.s.PGSQL.5432 }", "{ address: db:5432, tls: { ca_file: "+dir+"/ca.pem"+extra+" }, auth: AUTH }", 1)
	}
	for _, tt := range []struct {
		name, text string
		want       []string // empty: accepted
	}{
		{"cert verify-full file backend", strings.Replace(tcp(""), "AUTH", "[cert]", 1), nil},
		{"cert and scram", strings.Replace(tcp(""), "AUTH", "[cert, scram-sha-256]", 1), nil},
		{"trust on a socket", strings.Replace(base(""), "{ address: /var/run/postgresql/.s.PGSQL.5432 }", "{ address: /var/run/postgresql/.s.PGSQL.5432, auth: [trust] }", 1), nil},
		{"cert with verify-ca", strings.Replace(tcp(", mode: verify-ca"), "AUTH", "[cert]", 1),
			[]string{"pgward.yaml:3: upstreams.orders.tls.mode: is verify-ca, but auth lists cert, which needs verify-full"}},
		{"cert without TLS", strings.Replace(tcp(", mode: disable"), "AUTH", "[cert]", 1),
			[]string{"upstreams.orders.tls.mode: is disable, but auth lists cert"}},
		{"cert on a socket", strings.Replace(base(""), "{ address: /var/run/postgresql/.s.PGSQL.5432 }", "{ address: /var/run/postgresql/.s.PGSQL.5432, auth: [cert] }", 1),
			[]string{"upstreams.orders.auth: cert needs TLS"}},
		{"trust with scram", strings.Replace(tcp(""), "AUTH", "[trust, scram-sha-256]", 1),
			[]string{"upstreams.orders.auth: trust cannot be combined with other methods"}},
		{"unknown method", strings.Replace(tcp(""), "AUTH", "[certificate]", 1),
			[]string{`upstreams.orders.auth[0]: "certificate" is not one of scram-sha-256, md5, password, cert, trust`}},
		{"cert from env", strings.Replace(strings.Replace(tcp(""), "AUTH", "[cert]", 1), "secrets: { file: { path: "+dir+"/secrets.yaml } }", "secrets: { backend: env }", 1),
			[]string{"upstreams.orders.auth: cert needs a client certificate from the secrets backend, and env holds only passwords"}},
		{"cert from vault without pki", strings.Replace(strings.Replace(tcp(""), "AUTH", "[cert]", 1), "secrets: { file: { path: "+dir+"/secrets.yaml } }",
			"secrets:\n  backend: vault\n  vault: { address: \"http://127.0.0.1:8200\", auth: { method: token, token_file: "+dir+"/secrets.yaml }, roles: { orders: { orders_rw: { kv: { path: x } } } } }", 1),
			[]string{"upstreams.orders.auth: cert needs a client certificate, and secrets.vault.roles.orders maps no role to pki"}},
		{"vault pki ttl", strings.Replace(strings.Replace(tcp(""), "AUTH", "[cert]", 1), "secrets: { file: { path: "+dir+"/secrets.yaml } }",
			"secrets:\n  backend: vault\n  vault: { address: \"http://127.0.0.1:8200\", auth: { method: token, token_file: "+dir+"/secrets.yaml }, roles: { orders: { orders_rw: { pki: { ttl: 1ms } } } } }", 1),
			[]string{"secrets.vault.roles.orders.orders_rw.pki.ttl: must be at least 1s"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			p := filepath.Join(dir, "pgward.yaml")
			os.WriteFile(p, []byte(tt.text), 0o644)
			_, err := CheckConfig(p)
			if len(tt.want) == 0 {
				if err != nil {
					t.Fatalf("refused:\n%v", err)
				}
				return
			}
			if err == nil {
				t.Fatal("accepted")
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("missing %q in:\n%s", w, err)
				}
			}
		})
	}
}

func testCAPEM(t *testing.T) []byte {
	t.Helper()
	ca, err := testenv.NewCA()
	if err != nil {
		t.Fatal(err)
	}
	return ca.CertPEM
}
