package vault_test

import (
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/pgward/pgward/broker/secrets/vault"
)

func TestConfigYAML(t *testing.T) {
	const doc = `
address: https://vault.internal:8200
ca_file: /etc/pgward/vault-ca.pem
timeout: 3s
cache_ttl: 2m
lease_check_interval: 15s
lease_linger: 1m
auth:
  method: approle
  role_id: 4f1b…
  secret_id_file: /etc/pgward/vault-secret-id
  mount: approle-pgward
roles:
  orders:
    orders_rw: { kv: { mount: kv, path: pgward/orders/orders_rw, field: pw, version: 3 } }
    orders_ro: { database: { role: orders-ro } }
`
	var cfg vault.Config
	dec := yaml.NewDecoder(strings.NewReader(doc))
	dec.KnownFields(true)
	if err := dec.Decode(&cfg); err != nil {
		t.Fatal(err)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatalf("Validate: %v", err)
	}
	kv := cfg.Roles["orders"]["orders_rw"].KV
	if cfg.Timeout != 3*time.Second || cfg.CacheTTL != 2*time.Minute || cfg.LeaseLinger != time.Minute ||
		kv == nil || kv.Mount != "kv" || kv.Version != 3 || kv.Field != "pw" ||
		cfg.Roles["orders"]["orders_ro"].Database.Role != "orders-ro" || cfg.Auth.Mount != "approle-pgward" {
		t.Fatalf("decoded %+v", cfg)
	}
}

func TestConfigValidate(t *testing.T) {
	kv := vault.RoleConfig{KV: &vault.KVConfig{Path: "p"}}
	good := func() vault.Config {
		return vault.Config{
			Address: "http://127.0.0.1:8200",
			Auth:    vault.AuthConfig{Method: "token", TokenFile: "/t"},
			Roles:   map[string]map[string]vault.RoleConfig{"orders": {"rw": kv}},
		}
	}
	for _, tc := range []struct {
		name string
		edit func(*vault.Config)
		want []string // every one must be reported
	}{
		{"good", func(*vault.Config) {}, nil},
		{"empty", func(c *vault.Config) { *c = vault.Config{} },
			[]string{"address: required", "auth.method: required", "roles: no roles"}},
		{"address", func(c *vault.Config) { c.Address = "vault:8200" }, []string{"address: "}},
		{"durations", func(c *vault.Config) {
			c.Timeout, c.CacheTTL, c.LeaseCheckInterval = -1, -1, time.Millisecond
		}, []string{"timeout:", "cache_ttl:", "lease_check_interval:"}},
		{"method", func(c *vault.Config) { c.Auth.Method = "ldap" }, []string{`auth.method: "ldap"`}},
		{"token", func(c *vault.Config) { c.Auth.TokenFile = "" }, []string{"auth.token_file: required"}},
		{"approle", func(c *vault.Config) { c.Auth = vault.AuthConfig{Method: "approle", Role: "x"} },
			[]string{"auth.role_id: required", "auth.secret_id_file: required", "auth.role: role and jwt_file"}},
		{"kubernetes", func(c *vault.Config) { c.Auth = vault.AuthConfig{Method: "kubernetes", TokenFile: "/t"} },
			[]string{"auth.role: required", "auth.token_file: only used"}},
		{"roles", func(c *vault.Config) {
			c.Roles = map[string]map[string]vault.RoleConfig{
				"a": {},
				"b": {
					"none":   {},
					"both":   {KV: &vault.KVConfig{Path: "p"}, Database: &vault.DatabaseConfig{}},
					"nopath": {KV: &vault.KVConfig{Version: -1}},
					"data":   {KV: &vault.KVConfig{Path: "data/x"}},
				},
			}
		}, []string{"roles.a: no roles", "roles.b.none: needs kv, database or pki", "roles.b.both: has more than one of kv, database and pki",
			"roles.b.nopath.kv.path: required", "roles.b.nopath.kv.version:", "roles.b.data.kv.path:"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := good()
			tc.edit(&cfg)
			err := cfg.Validate()
			if len(tc.want) == 0 {
				if err != nil {
					t.Fatalf("Validate: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatal("Validate: nil error")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error does not report %q:\n%v", w, err)
				}
			}
		})
	}
}
