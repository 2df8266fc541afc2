package agent

import (
	"strings"
	"testing"
)

const goodConfig = `
listen:
  unix_dir: /run/pgward
upstreams:
  orders:
    address: db.internal:5432
    tls: { mode: verify-full, ca_file: /etc/pgward/ca.pem }
    application_name: "{app} via pgward {request_id}"
secrets:
  backend: file
  file: { path: /etc/pgward/secrets.yaml }
principals:
  billing:
    match: { uid: [1001], systemd_unit: billing.service }
grants:
  - { principal: billing, upstream: orders, roles: [orders_rw] }
audit: { path: /var/log/pgward/audit.jsonl, durability: write, parameters: redacted }
metrics: { listen: "127.0.0.1:9187" }
ebpf: { enabled: auto, enforce: false, guard: ["db.internal:5432"] }
`

func TestParseConfig(t *testing.T) {
	cfg, err := ParseConfig([]byte(goodConfig), "pgward.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Upstreams["orders"].Address != "db.internal:5432" || cfg.Principals["billing"].Match.SystemdUnit[0] != "billing.service" ||
		cfg.Grants[0].Roles[0] != "orders_rw" || cfg.Upstreams["orders"].ApplicationName != "{app} via pgward {request_id}" || cfg.Listen.SocketPath() != "/run/pgward/.s.PGSQL.5432" {
		t.Fatalf("decoded %+v", cfg)
	}
}

func TestParseConfigErrors(t *testing.T) {
	tests := []struct {
		name, yaml string
		want       []string
	}{
		{"unknown key", "listen:\n  unix_dir: /x\n  bogus: 1\n", []string{"pgward.yaml:3:", "bogus"}},
		{"wrong type", "listen:\n  port: abc\n", []string{"pgward.yaml:2:"}},
		{"empty", "", []string{"empty"}},
		{"validation with lines", `upstreams:
  orders:
    address: nohost
    tls:
      mode: sometimes
    application_name: "{app} {user}"
principals:
  p: { match: {} }
grants:
  - { principal: ghost, upstream: orders, roles: [r] }
secrets: { backend: carrier-pigeon }
ebpf: { enabled: maybe }
`, []string{
			"pgward.yaml:3: upstreams.orders.address",
			"pgward.yaml:5: upstreams.orders.tls.mode",
			"pgward.yaml:6: upstreams.orders.application_name",
			"pgward.yaml:8: principals.p.match",
			"pgward.yaml:10: grants[0].principal",
			"pgward.yaml:11: secrets.backend",
			"pgward.yaml:12: ebpf.enabled",
		}},
		{"event loop with fsync", "listen: { event_loop: true }\naudit: { durability: fsync }\n",
			[]string{"pgward.yaml:1: listen.event_loop: cannot be combined with audit.durability fsync"}},
		{"event loop threads", "listen: { event_loop: true, event_loop_threads: -1 }\n",
			[]string{"listen.event_loop_threads: must be between 1 and 256 (0: the default, 1)"}},
		{"event loop nice", "listen: { event_loop: true, event_loop_nice: -21 }\n",
			[]string{"listen.event_loop_nice: must be between -20 and 19 (a nice value; 0: the process's own)"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseConfig([]byte(tt.yaml), "pgward.yaml")
			if err == nil {
				t.Fatal("accepted")
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("missing %q in:\n%v", w, err)
				}
			}
		})
	}
}

func FuzzParseConfig(f *testing.F) {
	f.Add([]byte(goodConfig))
	f.Add([]byte("upstreams: {a: {address: x}}\ngrants: [{}]"))
	f.Fuzz(func(t *testing.T, b []byte) {
		cfg, err := ParseConfig(b, "f.yaml")
		if err == nil && cfg == nil {
			t.Fatal("nil config without error")
		}
		if err == nil {
			if verr := cfg.Validate(); verr != nil {
				t.Fatalf("accepted an invalid config: %v", verr)
			}
		}
	})
}

func TestParseConfigVault(t *testing.T) {
	_, err := ParseConfig([]byte(`upstreams:
  orders: { address: /run/pg/.s.PGSQL.5432 }
secrets:
  backend: vault
  vault:
    address: not-a-url
    auth: { method: token }
audit: { path: /tmp/a.jsonl }
`), "v.yaml")
	if err == nil || !strings.Contains(err.Error(), "v.yaml:6: secrets.vault.address") || !strings.Contains(err.Error(), "secrets.vault.auth.token_file") {
		t.Fatalf("got %v", err)
	}
	_, err = ParseConfig([]byte("upstreams: {o: {address: /x}}\nsecrets: {backend: vault}\naudit: {path: /a}\n"), "v.yaml")
	if err == nil || !strings.Contains(err.Error(), "secrets.vault: is required") {
		t.Fatalf("got %v", err)
	}
}
