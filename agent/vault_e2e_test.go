package agent

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pgward/pgward/broker"
	"github.com/pgward/pgward/broker/secrets/vault"
	"github.com/pgward/pgward/testenv"
	"github.com/pgward/pgward/testenv/vaultsim"
)

// Vault through the whole agent: KV and dynamic logins, a lease revoked in
// Vault ending the session, and a Vault outage refusing clearly while an
// upstream on the file backend keeps working.
func TestVaultThroughAgent(t *testing.T) {
	pg := testenv.SharedPostgres(t)
	sim := vaultsim.New(vaultsim.Options{Exec: pg.Exec, Logf: t.Logf})
	simClosed := false
	t.Cleanup(func() {
		if !simClosed {
			sim.Close()
		}
	})
	sim.PutKV("secret", "pgward/scram", map[string]any{"password": testenv.ScramPassword})
	sim.AddDatabaseRole("database", "app", vaultsim.DatabaseRole{
		CreationStatements: []string{
			`CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}'`,
			`GRANT CONNECT ON DATABASE ` + testenv.Database + ` TO "{{name}}"`,
		},
		// Leave the role's sessions alone on revocation: pgward must end them.
		RevocationStatements: []string{`SELECT 1`},
		DefaultTTL:           time.Hour,
	})
	var h *harness
	h = newHarness(t, func(h0 *harness, c *Config) {
		tokenFile := filepath.Join(h0.dir, "vault-token")
		if err := os.WriteFile(tokenFile, []byte(sim.RootToken()), 0o600); err != nil {
			t.Fatal(err)
		}
		c.Secrets.Vault = &vault.Config{
			Address:            sim.Addr(),
			Timeout:            2 * time.Second,
			Auth:               vault.AuthConfig{Method: "token", TokenFile: tokenFile},
			LeaseCheckInterval: time.Second,
			Roles: map[string]map[string]vault.RoleConfig{
				"vkv":  {testenv.ScramUser: {KV: &vault.KVConfig{Mount: "secret", Path: "pgward/scram"}}},
				"vdyn": {"app": {Database: &vault.DatabaseConfig{Mount: "database", Role: "app"}}},
			},
		}
		c.Upstreams["vkv"] = broker.UpstreamConfig{Address: pg.SocketPath(), Database: testenv.Database, Secrets: "vault"}
		c.Upstreams["vdyn"] = broker.UpstreamConfig{Address: pg.SocketPath(), Database: testenv.Database, Secrets: "vault"}
		c.Grants = append(c.Grants,
			broker.Grant{Principal: "me", Upstream: "vkv", Roles: []string{testenv.ScramUser}},
			broker.Grant{Principal: "me", Upstream: "vdyn", Roles: []string{"app"}})
	})
	ctx := context.Background()

	// KV v2.
	kv := h.connect(t, testenv.ScramUser, "vkv")
	var who string
	if err := kv.QueryRow(ctx, "select current_user").Scan(&who); err != nil || who != testenv.ScramUser {
		t.Fatalf("kv login: %q %v", who, err)
	}

	// Dynamic: Vault created the role; pgward logs in as it.
	dyn := h.connect(t, "app", "vdyn")
	if err := dyn.QueryRow(ctx, "select current_user").Scan(&who); err != nil || !strings.HasPrefix(who, "v-") {
		t.Fatalf("dynamic login: %q %v", who, err)
	}
	leases := sim.Leases()
	if len(leases) != 1 || leases[0].Username != who {
		t.Fatalf("leases %+v, session user %s", leases, who)
	}

	// Revoked in Vault: pgward ends the session within 5 s, saying why.
	if err := sim.RevokeLease(leases[0].ID); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		_, err := dyn.Exec(ctx, "select 1")
		if err != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("session still open 5 s after its lease was revoked")
		}
		time.Sleep(100 * time.Millisecond)
	}
	findEvent(t, h, "db.session.end", func(ev map[string]any) bool {
		return ev["db_service"] == "vdyn" && strings.Contains(asString(ev["reason"]), "revoked")
	})

	// Vault stopped: a clear refusal naming the backend, within a bound;
	// the file backend's upstream keeps working.
	sim.Close()
	simClosed = true
	start := time.Now()
	e := connectErr(t, h.dsn("app", "vdyn"))
	if e.Code != broker.CodeCannotConnect || !strings.Contains(e.Message, "secrets backend") {
		t.Fatalf("vault down: %s %q", e.Code, e.Message)
	}
	if el := time.Since(start); el > 8*time.Second {
		t.Fatalf("refusal took %v", el)
	}
	other := h.connect(t, testenv.ScramUser, "orders")
	if err := other.QueryRow(ctx, "select current_user").Scan(&who); err != nil || who != testenv.ScramUser {
		t.Fatalf("file-backed upstream during the Vault outage: %q %v", who, err)
	}
	if n := scrapeCounter(t, h, "pgward_auth_failures_total", `reason="backend_error"`); n < 1 {
		t.Fatalf("auth_failures_total{backend_error} = %v", n)
	}
	if n := scrapeCounter(t, h, "pgward_password_retrieval_failures_total", ""); n < 1 {
		t.Fatalf("password_retrieval_failures_total = %v", n)
	}

	// No secret anywhere pgward wrote.
	audit, _ := os.ReadFile(h.auditPath)
	for _, s := range []string{testenv.ScramPassword, sim.RootToken()} {
		if strings.Contains(string(audit), s) || strings.Contains(h.logs.String(), s) || strings.Contains(e.Message, s) {
			t.Fatalf("a secret (%d bytes) was written by pgward", len(s))
		}
	}
}

func asString(v any) string { s, _ := v.(string); return s }
