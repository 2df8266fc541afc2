package vault_test

// These tests run against the Vault simulator (testenv/vaultsim) and a real
// Postgres (testenv) by default. With PGWARD_TEST_VAULT_ADDR and
// PGWARD_TEST_VAULT_TOKEN set they run against that Vault instead (such as
// `vault server -dev`), configuring its KV and database engines themselves;
// the tests that need Vault to misbehave on demand skip there, saying so.

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"
	"github.com/jackc/pgx/v5"
	"go.uber.org/goleak"

	"github.com/pgward/pgward/broker/secrets"
	"github.com/pgward/pgward/broker/secrets/vault"
	"github.com/pgward/pgward/testenv"
	"github.com/pgward/pgward/testenv/vaultsim"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func kvRole(path, field string, version int) vault.RoleConfig {
	return vault.RoleConfig{KV: &vault.KVConfig{Path: path, Field: field, Version: version}}
}

func dbRoleCfg(mount, role string) vault.RoleConfig {
	return vault.RoleConfig{Database: &vault.DatabaseConfig{Mount: mount, Role: role}}
}

func (h *harness) withKVMount(cfg vault.Config) vault.Config {
	for _, roles := range cfg.Roles {
		for _, r := range roles {
			if r.KV != nil {
				r.KV.Mount = h.kvMount
			}
		}
	}
	return cfg
}

func TestKVLogin(t *testing.T) {
	h := newHarness(t)
	user, pw := h.createLogin("kv")
	h.putKV("pgward/orders/"+user, map[string]any{"password": pw, "note": "x"})
	cfg := h.withKVMount(h.config(map[string]map[string]vault.RoleConfig{
		"orders": {user: kvRole("pgward/orders/"+user, "", 0)},
	}))
	src := h.source(cfg)

	cred, err := src.Fetch(context.Background(), "orders", user)
	if err != nil {
		t.Fatalf("Fetch: %v", err)
	}
	if cred.Password.Reveal() != pw || cred.User != "" || cred.Lease != nil {
		t.Fatalf("Fetch = user %q lease %v, password matches %v", cred.User, cred.Lease, cred.Password.Reveal() == pw)
	}
	conn, err := h.connect(user, cred.Password.Reveal())
	if err != nil {
		t.Fatalf("login with the fetched password: %v", err)
	}
	_ = conn.Close(context.Background())

	// Served from the cache the second time; read again after Invalidate.
	if _, err := src.Fetch(context.Background(), "orders", user); err != nil {
		t.Fatal(err)
	}
	if h.sim != nil {
		if n := h.sim.Count("GET", h.kvMount+"/data/"); n != 1 {
			t.Errorf("kv reads = %d, want 1 (cached)", n)
		}
	}
	src.Invalidate("orders", user)
	if _, err := src.Fetch(context.Background(), "orders", user); err != nil {
		t.Fatal(err)
	}
	if h.sim != nil {
		if n := h.sim.Count("GET", h.kvMount+"/data/"); n != 2 {
			t.Errorf("kv reads after Invalidate = %d, want 2", n)
		}
	}
}

func TestKVUserField(t *testing.T) {
	h := newHarness(t)
	user, pw := h.createLogin("kvu")
	h.putKV("pgward/app", map[string]any{"username": user, "secret": pw})
	cfg := h.withKVMount(h.config(map[string]map[string]vault.RoleConfig{
		"orders": {"app": {KV: &vault.KVConfig{Path: "pgward/app", Field: "secret", UserField: "username"}}},
	}))
	cred, err := h.source(cfg).Fetch(context.Background(), "orders", "app")
	if err != nil {
		t.Fatal(err)
	}
	if cred.User != user || cred.Password.Reveal() != pw {
		t.Fatalf("got user %q", cred.User)
	}
	conn, err := h.connect(cred.User, cred.Password.Reveal())
	if err != nil {
		t.Fatal(err)
	}
	_ = conn.Close(context.Background())
}

func TestKVVersionPinning(t *testing.T) {
	h := newHarness(t)
	user, pw := h.createLogin("pin")
	v1 := h.putKV("pgward/pin", map[string]any{"password": pw})
	h.putKV("pgward/pin", map[string]any{"password": "rotated-" + randHex(8)})
	cfg := h.withKVMount(h.config(map[string]map[string]vault.RoleConfig{
		"orders": {
			user:     kvRole("pgward/pin", "", v1),
			"latest": kvRole("pgward/pin", "", 0),
			"future": kvRole("pgward/pin", "", v1+5),
		},
	}))
	src := h.source(cfg)
	pinned, err := src.Fetch(context.Background(), "orders", user)
	if err != nil {
		t.Fatal(err)
	}
	if pinned.Password.Reveal() != pw {
		t.Fatal("pinned version: wrong password")
	}
	conn, err := h.connect(user, pinned.Password.Reveal())
	if err != nil {
		t.Fatalf("login with the pinned version: %v", err)
	}
	_ = conn.Close(context.Background())
	latest, err := src.Fetch(context.Background(), "orders", "latest")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(latest.Password.Reveal(), "rotated-") {
		t.Fatal("latest: got the old version")
	}
	_, err = src.Fetch(context.Background(), "orders", "future")
	if !errors.Is(err, secrets.ErrNotFound) {
		t.Fatalf("missing version: err = %v, want ErrNotFound", err)
	}
	if h.sim != nil {
		if q := h.sim.Requests(); !strings.Contains(fmt.Sprint(q), fmt.Sprintf("version=%d", v1)) {
			t.Errorf("no ?version=%d request seen", v1)
		}
	}
}

func TestKVNotFound(t *testing.T) {
	h := newHarness(t)
	h.putKV("pgward/nofield", map[string]any{"other": "x-" + randHex(8)})
	cfg := h.withKVMount(h.config(map[string]map[string]vault.RoleConfig{
		"orders": {
			"missing": kvRole("pgward/does-not-exist", "", 0),
			"nofield": kvRole("pgward/nofield", "password", 0),
		},
	}))
	src := h.source(cfg)
	for _, tc := range []struct{ upstream, role, want string }{
		{"orders", "missing", "pgward/does-not-exist"},
		{"orders", "nofield", `no field "password"`},
		{"orders", "unmapped", `no vault mapping for role "unmapped"`},
		{"billing", "missing", `upstream "billing"`},
	} {
		_, err := src.Fetch(context.Background(), tc.upstream, tc.role)
		if !errors.Is(err, secrets.ErrNotFound) {
			t.Errorf("%s/%s: err = %v, want ErrNotFound", tc.upstream, tc.role, err)
			continue
		}
		if !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s/%s: error %q does not mention %q", tc.upstream, tc.role, err, tc.want)
		}
	}
}

func TestDatabaseLogin(t *testing.T) {
	h := newHarness(t)
	must(t, h.pg.Exec(context.Background(), `CREATE TABLE items (id int); INSERT INTO items VALUES (1), (2);`))
	h.addDBRole("reader", dbRole{
		creation: []string{
			`CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';`,
			`GRANT SELECT ON items TO "{{name}}";`,
		},
		ttl: time.Minute, maxTTL: time.Hour,
	})
	src := h.source(h.config(map[string]map[string]vault.RoleConfig{
		"orders": {"orders_ro": dbRoleCfg(h.dbMount, "reader")},
	}))
	cred, err := src.Fetch(context.Background(), "orders", "orders_ro")
	if err != nil {
		t.Fatalf("Fetch: %v", err)
	}
	h.remember(cred.Password.Reveal())
	if cred.Lease == nil || cred.Lease.ID == "" || cred.User == "" {
		t.Fatalf("dynamic credential without user or lease: %+v", cred)
	}
	defer cred.Lease.Release()
	if h.sim != nil && !strings.HasPrefix(cred.User, "v-reader-") {
		t.Errorf("user %q, want v-reader-…", cred.User)
	}
	conn, err := h.connect(cred.User, cred.Password.Reveal())
	if err != nil {
		t.Fatalf("login with the issued credential: %v", err)
	}
	defer conn.Close(context.Background())
	var n int
	if err := conn.QueryRow(context.Background(), `SELECT count(*) FROM items`).Scan(&n); err != nil || n != 2 {
		t.Fatalf("granted SELECT: n=%d err=%v", n, err)
	}
	select {
	case <-cred.Lease.Done:
		t.Fatal("Done closed on a fresh lease")
	default:
	}
}

func TestDatabaseSharedThenRevokedWhenUnused(t *testing.T) {
	h := newHarness(t)
	h.addDBRole("rw", dbRole{ttl: time.Minute, maxTTL: time.Hour})
	src := h.source(h.config(map[string]map[string]vault.RoleConfig{"orders": {"rw": dbRoleCfg(h.dbMount, "rw")}}))
	a, err := src.Fetch(context.Background(), "orders", "rw")
	must(t, err)
	b, err := src.Fetch(context.Background(), "orders", "rw")
	must(t, err)
	h.remember(a.Password.Reveal())
	if a.Lease.ID != b.Lease.ID || a.User != b.User {
		t.Fatal("two sessions got different leases; want one shared")
	}
	if h.sim != nil {
		if n := h.sim.Count("", h.dbMount+"/creds/"); n != 1 {
			t.Fatalf("creds requests = %d, want 1", n)
		}
	}
	a.Lease.Release()
	a.Lease.Release() // a second call by the same session is ignored
	time.Sleep(500 * time.Millisecond)
	select {
	case <-a.Lease.Done:
		t.Fatal("lease ended while a session still holds it")
	default:
	}
	b.Lease.Release()
	select {
	case <-b.Lease.Done:
	case <-time.After(5 * time.Second):
		t.Fatal("lease not revoked after its last user released it")
	}
	if r := b.Lease.Reason(); r != vault.ReasonRevoked {
		t.Errorf("Reason = %q, want %q", r, vault.ReasonRevoked)
	}
	eventually(t, 5*time.Second, "role dropped after revocation", func() bool { return !h.roleExists(a.User) })
	// The next session gets a new lease.
	c, err := src.Fetch(context.Background(), "orders", "rw")
	must(t, err)
	defer c.Lease.Release()
	if c.Lease.ID == a.Lease.ID {
		t.Fatal("revoked lease handed out again")
	}
}

func TestDatabaseLeaseRenewal(t *testing.T) {
	h := newHarness(t)
	h.addDBRole("short", dbRole{ttl: 3 * time.Second, maxTTL: time.Hour})
	src := h.source(h.config(map[string]map[string]vault.RoleConfig{"orders": {"rw": dbRoleCfg(h.dbMount, "short")}}))
	cred, err := src.Fetch(context.Background(), "orders", "rw")
	must(t, err)
	h.remember(cred.Password.Reveal())
	defer cred.Lease.Release()
	time.Sleep(5 * time.Second) // past the original TTL
	select {
	case <-cred.Lease.Done:
		t.Fatalf("lease ended (%s) although it is renewable and in use", cred.Lease.Reason())
	default:
	}
	if h.sim != nil {
		if n := h.sim.Count("PUT", "sys/leases/renew"); n < 1 {
			t.Fatalf("renewals = %d, want ≥1", n)
		}
	}
	// VALID UNTIL was moved along: the login still works past the first TTL.
	conn, err := h.connect(cred.User, cred.Password.Reveal())
	if err != nil {
		t.Fatalf("login after renewal: %v", err)
	}
	_ = conn.Close(context.Background())
}

func TestDatabaseRenewalRefused(t *testing.T) {
	h := newHarness(t)
	h.needSim("refuses renewals")
	h.addDBRole("short", dbRole{ttl: 3 * time.Second, maxTTL: time.Hour})
	src := h.source(h.config(map[string]map[string]vault.RoleConfig{"orders": {"rw": dbRoleCfg(h.dbMount, "short")}}))
	h.sim.Inject(vaultsim.Fault{Path: "sys/leases/renew", Status: 400, Errors: []string{"lease is not renewable"}})
	cred, err := src.Fetch(context.Background(), "orders", "rw")
	must(t, err)
	h.remember(cred.Password.Reveal())
	defer cred.Lease.Release()
	start := time.Now()
	select {
	case <-cred.Lease.Done:
	case <-time.After(6 * time.Second):
		t.Fatal("Done not closed at the end of a lease that could not be renewed")
	}
	if d := time.Since(start); d < 2*time.Second {
		t.Errorf("ended after %v, before its 3s TTL", d)
	}
	if r := cred.Lease.Reason(); r != vault.ReasonExpired {
		t.Errorf("Reason = %q, want %q", r, vault.ReasonExpired)
	}
}

func TestDatabaseRevokedInVault(t *testing.T) {
	h := newHarness(t)
	h.addDBRole("rw", dbRole{ttl: time.Minute, maxTTL: time.Hour})
	src := h.source(h.config(map[string]map[string]vault.RoleConfig{"orders": {"rw": dbRoleCfg(h.dbMount, "rw")}}))
	cred, err := src.Fetch(context.Background(), "orders", "rw")
	must(t, err)
	h.remember(cred.Password.Reveal())
	defer cred.Lease.Release()
	conn, err := h.connect(cred.User, cred.Password.Reveal())
	must(t, err)
	defer conn.Close(context.Background())

	start := time.Now()
	h.revokeInVault(cred.Lease.ID)
	select {
	case <-cred.Lease.Done:
	case <-time.After(5 * time.Second):
		t.Fatal("Done not closed within 5s of the revocation")
	}
	t.Logf("revocation noticed after %v", time.Since(start).Round(time.Millisecond))
	if r := cred.Lease.Reason(); r != vault.ReasonRevoked {
		t.Errorf("Reason = %q, want %q", r, vault.ReasonRevoked)
	}
	eventually(t, 5*time.Second, "role dropped", func() bool { return !h.roleExists(cred.User) })
	if h.sim != nil { // the simulator's revocation terminates the role's backends
		if err := conn.Ping(context.Background()); err == nil {
			t.Error("session of the revoked role still alive")
		}
	}
	next, err := src.Fetch(context.Background(), "orders", "rw")
	must(t, err)
	defer next.Lease.Release()
	if next.Lease.ID == cred.Lease.ID {
		t.Fatal("revoked lease handed out again")
	}
}

func TestDatabaseLeaseExpiry(t *testing.T) {
	h := newHarness(t)
	h.addDBRole("brief", dbRole{ttl: 2 * time.Second, maxTTL: 3 * time.Second})
	src := h.source(h.config(map[string]map[string]vault.RoleConfig{"orders": {"rw": dbRoleCfg(h.dbMount, "brief")}}))
	cred, err := src.Fetch(context.Background(), "orders", "rw")
	must(t, err)
	h.remember(cred.Password.Reveal())
	defer cred.Lease.Release()
	select {
	case <-cred.Lease.Done:
	case <-time.After(8 * time.Second):
		t.Fatal("Done not closed after the lease's max TTL")
	}
	if r := cred.Lease.Reason(); r != vault.ReasonExpired {
		t.Errorf("Reason = %q, want %q", r, vault.ReasonExpired)
	}
	eventually(t, 10*time.Second, "expired role dropped", func() bool { return !h.roleExists(cred.User) })
}

func TestDatabaseTTLShortenedInVault(t *testing.T) {
	h := newHarness(t)
	h.needSim("shortens a lease's TTL from the server side")
	h.addDBRole("rw", dbRole{ttl: time.Hour, maxTTL: 24 * time.Hour})
	src := h.source(h.config(map[string]map[string]vault.RoleConfig{"orders": {"rw": dbRoleCfg(h.dbMount, "rw")}}))
	cred, err := src.Fetch(context.Background(), "orders", "rw")
	must(t, err)
	h.remember(cred.Password.Reveal())
	defer cred.Lease.Release()
	must(t, h.sim.SetLeaseTTL(cred.Lease.ID, 2*time.Second))
	select {
	case <-cred.Lease.Done:
	case <-time.After(5 * time.Second):
		t.Fatal("Done not closed within 5s of a 2s TTL")
	}
	if r := cred.Lease.Reason(); r != vault.ReasonExpired {
		t.Errorf("Reason = %q, want %q", r, vault.ReasonExpired)
	}
	eventually(t, 5*time.Second, "expired role dropped", func() bool { return !h.roleExists(cred.User) })
}

func TestVaultStopped(t *testing.T) {
	h := newHarness(t)
	user, pw := h.createLogin("stop")
	h.putKV("pgward/a", map[string]any{"password": pw})
	h.putKV("pgward/b", map[string]any{"password": pw})
	roles := map[string]map[string]vault.RoleConfig{"orders": {user: kvRole("pgward/a", "", 0), "b": kvRole("pgward/b", "", 0)}}
	cfg := h.withKVMount(h.config(roles))
	src := h.source(cfg)
	if _, err := src.Fetch(context.Background(), "orders", user); err != nil {
		t.Fatal(err)
	}
	if h.sim != nil {
		h.sim.Close()
	} else {
		// A real Vault cannot be stopped from here: use a second source
		// pointed at a port nothing listens on.
		cfg.Address = closedAddr(t)
		src = h.source(cfg)
	}
	start := time.Now()
	_, err := src.Fetch(context.Background(), "orders", "b")
	if !errors.Is(err, secrets.ErrUnavailable) {
		t.Fatalf("err = %v, want ErrUnavailable", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("took %v to notice Vault is down", d)
	}
	t.Logf("error: %v", err)
}

func TestVaultUnreachableAtStart(t *testing.T) {
	h := newHarness(t)
	cfg := h.withKVMount(h.config(map[string]map[string]vault.RoleConfig{"orders": {"a": kvRole("pgward/a", "", 0)}}))
	cfg.Address = closedAddr(t)
	src := h.source(cfg) // New succeeds: Vault may come up later
	start := time.Now()
	if _, err := src.Fetch(context.Background(), "orders", "a"); !errors.Is(err, secrets.ErrUnavailable) {
		t.Fatalf("err = %v, want ErrUnavailable", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("took %v", d)
	}
}

func TestNewFailsOnBadCredentials(t *testing.T) {
	h := newHarness(t)
	cfg := h.withKVMount(h.config(map[string]map[string]vault.RoleConfig{"orders": {"a": kvRole("pgward/a", "", 0)}}))
	good := cfg.Auth.TokenFile
	for name, edit := range map[string]func(*vault.Config){
		"missing token file": func(c *vault.Config) { c.Auth.TokenFile = filepath.Join(t.TempDir(), "nope") },
		"empty token file": func(c *vault.Config) {
			c.Auth.TokenFile = filepath.Join(t.TempDir(), "empty")
			must(t, os.WriteFile(c.Auth.TokenFile, nil, 0o600))
		},
		"unknown token": func(c *vault.Config) { c.Auth.TokenFile = h.tokenFile("hvs.unknown-" + randHex(8)) },
		"missing secret_id file": func(c *vault.Config) {
			c.Auth = vault.AuthConfig{Method: vault.MethodAppRole, RoleID: "r", SecretIDFile: filepath.Join(t.TempDir(), "nope")}
		},
		"missing jwt file": func(c *vault.Config) {
			c.Auth = vault.AuthConfig{Method: vault.MethodKubernetes, Role: "r", JWTFile: filepath.Join(t.TempDir(), "nope")}
		},
		"invalid config": func(c *vault.Config) { c.Address = "" },
	} {
		c := cfg
		c.Auth.TokenFile = good
		edit(&c)
		if _, err := vault.New(c, nil); err == nil {
			t.Errorf("%s: New succeeded", name)
		} else {
			t.Logf("%s: %v", name, err)
		}
	}
}

func TestSealed(t *testing.T) {
	h := newHarness(t)
	h.needSim("seals Vault")
	h.putKV("pgward/a", map[string]any{"password": "pw-" + randHex(8)})
	src := h.source(h.withKVMount(h.config(map[string]map[string]vault.RoleConfig{"orders": {"a": kvRole("pgward/a", "", 0)}})))
	h.sim.Seal()
	start := time.Now()
	_, err := src.Fetch(context.Background(), "orders", "a")
	if !errors.Is(err, secrets.ErrUnavailable) || !strings.Contains(err.Error(), "sealed") {
		t.Fatalf("err = %v, want ErrUnavailable mentioning sealed", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("took %v", d)
	}
	h.sim.Unseal()
	if _, err := src.Fetch(context.Background(), "orders", "a"); err != nil {
		t.Fatalf("after unseal: %v", err)
	}
}

func TestServerErrors(t *testing.T) {
	h := newHarness(t)
	h.needSim("injects HTTP errors")
	h.putKV("pgward/a", map[string]any{"password": "pw-" + randHex(8)})
	h.addDBRole("rw", dbRole{ttl: time.Minute, maxTTL: time.Hour})
	src := h.source(h.withKVMount(h.config(map[string]map[string]vault.RoleConfig{
		"orders": {"kv": kvRole("pgward/a", "", 0), "db": dbRoleCfg(h.dbMount, "rw"), "nodb": dbRoleCfg(h.dbMount, "nope")},
	})))
	for _, tc := range []struct {
		status int
		role   string
		want   error
		text   string
	}{
		{403, "kv", secrets.ErrDenied, "permission denied"},
		{403, "db", secrets.ErrDenied, "database/creds/rw"},
		{404, "kv", secrets.ErrNotFound, "secret/data/pgward/a"},
		{500, "kv", secrets.ErrUnavailable, "HTTP 500"},
		{502, "db", secrets.ErrUnavailable, "HTTP 502"},
		{503, "kv", secrets.ErrUnavailable, "HTTP 503"},
		{429, "db", secrets.ErrUnavailable, "rate limit"},
		{0, "nodb", secrets.ErrNotFound, "unknown role"},
	} {
		t.Run(fmt.Sprintf("%d_%s", tc.status, tc.role), func(t *testing.T) {
			if tc.status != 0 {
				defer h.sim.Inject(vaultsim.Fault{Status: tc.status, Path: map[bool]string{true: "secret/", false: "database/"}[tc.role == "kv"]})()
			}
			_, err := src.Fetch(context.Background(), "orders", tc.role)
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
			if !strings.Contains(err.Error(), tc.text) {
				t.Errorf("error %q does not mention %q", err, tc.text)
			}
		})
	}
}

func TestSlowVaultIsBounded(t *testing.T) {
	h := newHarness(t)
	h.needSim("delays answers")
	h.putKV("pgward/a", map[string]any{"password": "pw-" + randHex(8)})
	cfg := h.withKVMount(h.config(map[string]map[string]vault.RoleConfig{"orders": {"a": kvRole("pgward/a", "", 0)}}))
	cfg.Timeout = 500 * time.Millisecond
	src := h.source(cfg)
	remove := h.sim.Inject(vaultsim.Fault{Path: "secret/", Delay: 10 * time.Second})
	start := time.Now()
	_, err := src.Fetch(context.Background(), "orders", "a")
	if !errors.Is(err, secrets.ErrUnavailable) || !strings.Contains(err.Error(), "timed out") {
		t.Fatalf("err = %v, want ErrUnavailable, timed out", err)
	}
	if d := time.Since(start); d > 1500*time.Millisecond {
		t.Errorf("took %v with a 500ms timeout", d)
	}
	// The caller's own deadline is honoured too.
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start = time.Now()
	if _, err := src.Fetch(ctx, "orders", "a"); !errors.Is(err, secrets.ErrUnavailable) {
		t.Fatalf("err = %v", err)
	}
	if d := time.Since(start); d > 400*time.Millisecond {
		t.Errorf("caller deadline 100ms: took %v", d)
	}
	remove()
	eventually(t, 3*time.Second, "fetch works once Vault is fast again", func() bool {
		_, err := src.Fetch(context.Background(), "orders", "a")
		return err == nil
	})
}

func TestSingleflight(t *testing.T) {
	h := newHarness(t)
	h.needSim("counts requests and delays them")
	h.putKV("pgward/a", map[string]any{"password": "pw-" + randHex(8)})
	h.addDBRole("rw", dbRole{ttl: time.Minute, maxTTL: time.Hour})
	src := h.source(h.withKVMount(h.config(map[string]map[string]vault.RoleConfig{
		"orders": {"kv": kvRole("pgward/a", "", 0), "db": dbRoleCfg(h.dbMount, "rw")},
	})))
	h.sim.Inject(vaultsim.Fault{Delay: 300 * time.Millisecond, Path: "database/creds/"})
	h.sim.Inject(vaultsim.Fault{Delay: 300 * time.Millisecond, Path: "secret/"})
	const n = 20
	var wg sync.WaitGroup
	creds := make([]secrets.Credential, n)
	errs := make([]error, 2*n)
	for i := range n {
		wg.Add(2)
		go func() { defer wg.Done(); creds[i], errs[i] = src.Fetch(context.Background(), "orders", "db") }()
		go func() { defer wg.Done(); _, errs[n+i] = src.Fetch(context.Background(), "orders", "kv") }()
	}
	wg.Wait()
	for _, err := range errs {
		must(t, err)
	}
	h.remember(creds[0].Password.Reveal())
	for _, c := range creds {
		if c.Lease.ID != creds[0].Lease.ID {
			t.Fatal("concurrent fetches got different leases")
		}
	}
	if got := h.sim.Count("", "database/creds/"); got != 1 {
		t.Errorf("creds requests = %d, want 1", got)
	}
	if got := h.sim.Count("", "secret/data/"); got != 1 {
		t.Errorf("kv requests = %d, want 1", got)
	}
	for i, c := range creds {
		c.Lease.Release()
		if i < n-1 {
			select {
			case <-c.Lease.Done:
				t.Fatalf("lease ended after %d of %d releases", i+1, n)
			default:
			}
		}
	}
	select {
	case <-creds[0].Lease.Done:
	case <-time.After(5 * time.Second):
		t.Fatal("lease not revoked after the last of 20 releases")
	}
}

func TestTokenFileAuthRenewal(t *testing.T) {
	h := newHarness(t)
	h.putKV("pgward/a", map[string]any{"password": "pw-" + randHex(8)})
	cfg := h.withKVMount(h.config(map[string]map[string]vault.RoleConfig{"orders": {"a": kvRole("pgward/a", "", 0)}}))
	cfg.CacheTTL = time.Millisecond // read Vault every time
	cfg.Auth.TokenFile = h.tokenFile(h.pgwardToken(3*time.Second, true))
	src := h.source(cfg)
	time.Sleep(5 * time.Second) // past the token's first TTL
	if _, err := src.Fetch(context.Background(), "orders", "a"); err != nil {
		t.Fatalf("Fetch after the token's first TTL: %v", err)
	}
	if h.sim != nil {
		if n := h.sim.Count("", "auth/token/renew-self"); n < 1 {
			t.Errorf("renew-self calls = %d, want ≥1", n)
		}
	}
}

func TestTokenFileRotated(t *testing.T) {
	h := newHarness(t)
	h.needSim("revokes pgward's token")
	h.putKV("pgward/a", map[string]any{"password": "pw-" + randHex(8)})
	cfg := h.withKVMount(h.config(map[string]map[string]vault.RoleConfig{"orders": {"a": kvRole("pgward/a", "", 0)}}))
	cfg.CacheTTL = time.Millisecond
	old := h.pgwardToken(0, false)
	cfg.Auth.TokenFile = h.tokenFile(old)
	src := h.source(cfg)
	must(t, errors.Join(func() error { _, err := src.Fetch(context.Background(), "orders", "a"); return err }()))
	// An external agent rotates the token: the old one is revoked, the file
	// rewritten. pgward notices the 403 and reads the file again.
	newTok := h.pgwardToken(0, false)
	h.remember(newTok)
	must(t, os.WriteFile(cfg.Auth.TokenFile, []byte(newTok), 0o600))
	h.sim.RevokeToken(old)
	time.Sleep(2100 * time.Millisecond) // relogins are rate-limited to one per 2s
	if _, err := src.Fetch(context.Background(), "orders", "a"); err != nil {
		t.Fatalf("Fetch after rotation: %v", err)
	}
}

func TestAppRoleAuth(t *testing.T) {
	h := newHarness(t)
	h.putKV("pgward/a", map[string]any{"password": "pw-" + randHex(8)})
	cfg := h.withKVMount(h.config(map[string]map[string]vault.RoleConfig{"orders": {"a": kvRole("pgward/a", "", 0)}}))
	mount := "approle"
	roleID, secretID := "role-"+randHex(8), "secret-id-"+randHex(16)
	if h.sim != nil {
		h.sim.AddAppRole(mount, vaultsim.AppRole{RoleID: roleID, SecretID: secretID,
			Token: vaultsim.TokenOptions{TTL: 3 * time.Second, Renewable: true}})
	} else {
		mount = "pgward-approle-" + randHex(4)
		must(t, h.admin.Sys().EnableAuthWithOptions(mount, &vaultAuthOptions))
		t.Cleanup(func() { _ = h.admin.Sys().DisableAuth(mount) })
		_, err := h.admin.Logical().Write("auth/"+mount+"/role/pgward", map[string]any{
			"token_policies": []string{h.policy}, "token_ttl": "3s", "token_max_ttl": "1h"})
		must(t, err)
		sec, err := h.admin.Logical().Read("auth/" + mount + "/role/pgward/role-id")
		must(t, err)
		roleID = sec.Data["role_id"].(string)
		sec, err = h.admin.Logical().Write("auth/"+mount+"/role/pgward/secret-id", nil)
		must(t, err)
		secretID = sec.Data["secret_id"].(string)
	}
	h.remember(secretID)
	sidFile := filepath.Join(t.TempDir(), "secret-id")
	must(t, os.WriteFile(sidFile, []byte(secretID+"\n"), 0o600))
	cfg.Auth = vault.AuthConfig{Method: vault.MethodAppRole, RoleID: roleID, SecretIDFile: sidFile, Mount: mount}
	cfg.CacheTTL = time.Millisecond
	src := h.source(cfg)
	if _, err := src.Fetch(context.Background(), "orders", "a"); err != nil {
		t.Fatalf("Fetch: %v", err)
	}
	time.Sleep(4 * time.Second) // past the login token's TTL: renewed meanwhile
	if _, err := src.Fetch(context.Background(), "orders", "a"); err != nil {
		t.Fatalf("Fetch after the token's TTL: %v", err)
	}
	if h.sim != nil {
		if n := h.sim.Count("", "auth/token/renew-self"); n < 1 {
			t.Errorf("renew-self calls = %d, want ≥1", n)
		}
	}

	// A wrong secret_id is a denied login: New fails.
	must(t, os.WriteFile(sidFile, []byte("wrong-"+randHex(8)), 0o600))
	if _, err := vault.New(cfg, nil); !errors.Is(err, secrets.ErrDenied) {
		t.Fatalf("New with a wrong secret_id: err = %v, want ErrDenied", err)
	}
}

func TestKubernetesAuth(t *testing.T) {
	h := newHarness(t)
	h.needSim("a Kubernetes auth backend needs a Kubernetes API server")
	h.putKV("pgward/a", map[string]any{"password": "pw-" + randHex(8)})
	cfg := h.withKVMount(h.config(map[string]map[string]vault.RoleConfig{"orders": {"a": kvRole("pgward/a", "", 0)}}))
	jwt := "eyJhbGciOiJSUzI1NiJ9." + randHex(32) + ".sig"
	h.remember(jwt)
	h.sim.AddKubernetesRole("k8s", vaultsim.KubernetesRole{Name: "pgward", JWT: jwt,
		Token: vaultsim.TokenOptions{TTL: time.Minute, Renewable: true}})
	jwtFile := filepath.Join(t.TempDir(), "token")
	must(t, os.WriteFile(jwtFile, []byte(jwt), 0o600))
	cfg.Auth = vault.AuthConfig{Method: vault.MethodKubernetes, Role: "pgward", JWTFile: jwtFile, Mount: "k8s"}
	src := h.source(cfg)
	if _, err := src.Fetch(context.Background(), "orders", "a"); err != nil {
		t.Fatalf("Fetch: %v", err)
	}
	if n := h.sim.Count("PUT", "auth/k8s/login"); n != 1 {
		t.Errorf("logins = %d, want 1", n)
	}
	must(t, os.WriteFile(jwtFile, []byte("not-the-jwt"), 0o600))
	if _, err := vault.New(cfg, nil); !errors.Is(err, secrets.ErrDenied) {
		t.Fatalf("New with a wrong JWT: err = %v, want ErrDenied", err)
	}
}

func TestTLS(t *testing.T) {
	h := newHarness(t)
	h.needSim("serves HTTPS with its own certificate")
	sim := vaultsim.New(vaultsim.Options{TLS: true})
	defer sim.Close()
	sim.PutKV("secret", "pgward/a", map[string]any{"password": "pw-" + randHex(8)})
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	must(t, os.WriteFile(caFile, sim.CACertPEM(), 0o600))
	cfg := vault.Config{
		Address: sim.Addr(),
		CAFile:  caFile,
		Auth:    vault.AuthConfig{Method: vault.MethodToken, TokenFile: h.tokenFile(sim.RootToken())},
		Roles:   map[string]map[string]vault.RoleConfig{"orders": {"a": kvRole("pgward/a", "", 0)}},
	}
	if _, err := h.source(cfg).Fetch(context.Background(), "orders", "a"); err != nil {
		t.Fatalf("Fetch over TLS: %v", err)
	}
	cfg.CAFile = ""
	src := h.source(cfg) // unverifiable certificate: unavailable, not fatal at New
	if _, err := src.Fetch(context.Background(), "orders", "a"); !errors.Is(err, secrets.ErrUnavailable) {
		t.Fatalf("without ca_file: err = %v, want ErrUnavailable", err)
	}
}

func TestCloseRevokesHeldLeases(t *testing.T) {
	h := newHarness(t)
	h.addDBRole("rw", dbRole{ttl: time.Minute, maxTTL: time.Hour})
	src := h.source(h.config(map[string]map[string]vault.RoleConfig{"orders": {"rw": dbRoleCfg(h.dbMount, "rw")}}))
	cred, err := src.Fetch(context.Background(), "orders", "rw")
	must(t, err)
	h.remember(cred.Password.Reveal())
	src.Close()
	select {
	case <-cred.Lease.Done:
	default:
		t.Fatal("Close left a lease open")
	}
	if r := cred.Lease.Reason(); r != vault.ReasonRevoked {
		t.Errorf("Reason = %q", r)
	}
	cred.Lease.Release() // after Close: harmless
	if h.roleExists(cred.User) {
		t.Error("role still exists after Close revoked its lease")
	}
	if _, err := src.Fetch(context.Background(), "orders", "rw"); !errors.Is(err, secrets.ErrUnavailable) {
		t.Fatalf("Fetch after Close: err = %v", err)
	}
	src.Close() // idempotent
}

// TestNoSecretsInLogsOrErrors drives every path with canary secrets and
// checks that no log line (at debug level) and no error string holds one.
func TestNoSecretsInLogsOrErrors(t *testing.T) {
	h := newHarness(t)
	h.needSim("injects failures on every path")
	canaryPW := "CANARY-PW-" + randHex(8)
	canaryTok := "hvs.CANARY-TOKEN-" + randHex(8)
	canarySID := "CANARY-SECRET-ID-" + randHex(8)
	h.remember(canaryPW, canaryTok, canarySID)
	h.putKV("pgward/a", map[string]any{"password": canaryPW, "username": canaryPW})
	h.addDBRole("rw", dbRole{ttl: 3 * time.Second, maxTTL: time.Hour})
	h.sim.AddToken(canaryTok, vaultsim.TokenOptions{TTL: 2 * time.Second, Renewable: true})
	cfg := h.withKVMount(h.config(map[string]map[string]vault.RoleConfig{
		"orders": {
			"kv":     kvRole("pgward/a", "", 0),
			"nouser": {KV: &vault.KVConfig{Path: "pgward/a", UserField: "nope"}},
			"wrong":  kvRole("pgward/a", "missing", 0),
			"db":     dbRoleCfg(h.dbMount, "rw"),
		},
	}))
	cfg.CacheTTL = time.Millisecond
	cfg.LeaseLinger = -1 // revoke on release: every db fetch asks Vault
	cfg.Auth.TokenFile = h.tokenFile(canaryTok)
	src := h.source(cfg)

	var errs []error
	fetch := func(role string) {
		cred, err := src.Fetch(context.Background(), "orders", role)
		if err != nil {
			errs = append(errs, err)
			return
		}
		h.remember(cred.Password.Reveal())
		for _, s := range []string{fmt.Sprint(cred), fmt.Sprintf("%+v", cred), fmt.Sprintf("%#v", cred)} {
			if strings.Contains(s, cred.Password.Reveal()) {
				t.Errorf("formatting a Credential shows its password")
			}
		}
		if cred.Lease != nil {
			defer cred.Lease.Release()
		}
	}
	for _, role := range []string{"kv", "nouser", "wrong", "db", "db"} {
		fetch(role)
	}
	for _, status := range []int{400, 403, 404, 500, 503} {
		remove := h.sim.Inject(vaultsim.Fault{Status: status})
		fetch("kv")
		fetch("db")
		remove()
	}
	h.sim.Seal()
	fetch("kv")
	h.sim.Unseal()
	time.Sleep(3 * time.Second) // token and lease renewals, lease lookups
	lease := h.sim.Leases()
	if len(lease) > 0 {
		must(t, h.sim.RevokeLease(lease[0].ID))
	}
	time.Sleep(1500 * time.Millisecond)
	// A wrong approle secret_id in an error.
	sidFile := filepath.Join(t.TempDir(), "sid")
	must(t, os.WriteFile(sidFile, []byte(canarySID), 0o600))
	h.sim.AddAppRole("approle", vaultsim.AppRole{RoleID: "r", SecretID: "other"})
	acfg := cfg
	acfg.Auth = vault.AuthConfig{Method: vault.MethodAppRole, RoleID: "r", SecretIDFile: sidFile}
	_, err := vault.New(acfg, slog.New(slog.NewJSONHandler(h.logs, &slog.HandlerOptions{Level: slog.LevelDebug})))
	errs = append(errs, err)

	if len(errs) < 14 {
		t.Fatalf("only %d errors exercised", len(errs))
	}
	h.mu.Lock()
	known := append([]string(nil), h.secrets...)
	h.mu.Unlock()
	for _, err := range errs {
		for _, text := range []string{err.Error(), fmt.Sprintf("%+v", err), fmt.Sprintf("%#v", err)} {
			for _, s := range known {
				if strings.Contains(text, s) {
					t.Errorf("error shows a secret: %s", strings.ReplaceAll(text, s, "<SECRET>"))
				}
			}
		}
	}
	if !strings.Contains(h.logs.String(), "vault lease ended") {
		t.Error("log lacks the lease end (is debug logging captured?)")
	}
	// checkLogs (at cleanup) asserts no secret was logged.
}

// ---- harness ----

// Environment variables that run these tests against a real Vault (for
// example `vault server -dev`) instead of the simulator.
const (
	envVaultAddr  = "PGWARD_TEST_VAULT_ADDR"
	envVaultToken = "PGWARD_TEST_VAULT_TOKEN"
)

// harness is one test's Vault (simulated or real) and Postgres. In real mode
// every mount it creates has a unique name and is removed at cleanup.
type harness struct {
	t         *testing.T
	pg        *testenv.Postgres
	addr      string
	rootToken string
	sim       *vaultsim.Server // nil against a real Vault
	admin     *api.Client      // root client, real mode only
	kvMount   string
	dbMount   string
	policy    string // real mode: the policy of docs/vault.md, for logins
	logs      *testenv.SyncBuffer

	mu      sync.Mutex
	secrets []string // every secret the test handled: must never be logged
}

func realVault() bool { return os.Getenv(envVaultAddr) != "" && os.Getenv(envVaultToken) != "" }

// needSim skips a test that makes Vault misbehave, which only the simulator
// can do on demand.
func (h *harness) needSim(why string) {
	h.t.Helper()
	if h.sim == nil {
		h.t.Skipf("needs the Vault simulator (%s); running against a real Vault (%s)", why, envVaultAddr)
	}
}

func newHarness(t *testing.T) *harness {
	t.Helper()
	h := &harness{t: t, pg: testenv.Require(t), logs: &testenv.SyncBuffer{}}
	if realVault() {
		h.setupReal()
	} else {
		h.sim = vaultsim.New(vaultsim.Options{Exec: h.pg.Exec, Logf: t.Logf})
		t.Cleanup(h.sim.Close)
		h.addr, h.rootToken = h.sim.Addr(), h.sim.RootToken()
		h.kvMount, h.dbMount = "secret", "database"
	}
	h.remember(h.rootToken)
	t.Cleanup(h.checkLogs)
	return h
}

func (h *harness) setupReal() {
	t := h.t
	h.addr, h.rootToken = os.Getenv(envVaultAddr), os.Getenv(envVaultToken)
	adm, err := api.NewClient(&api.Config{Address: h.addr})
	if err != nil {
		t.Fatalf("vault client: %v", err)
	}
	adm.SetToken(h.rootToken)
	h.admin = adm
	sfx := randHex(4)
	h.kvMount, h.dbMount = "pgward-kv-"+sfx, "pgward-db-"+sfx
	must(t, adm.Sys().Mount(h.kvMount, &api.MountInput{Type: "kv", Options: map[string]string{"version": "2"}}))
	t.Cleanup(func() { _ = adm.Sys().Unmount(h.kvMount) })
	must(t, adm.Sys().Mount(h.dbMount, &api.MountInput{Type: "database"}))
	t.Cleanup(func() { _ = adm.Sys().Unmount(h.dbMount) }) // revokes its leases
	_, err = adm.Logical().Write(h.dbMount+"/config/pg", map[string]any{
		"plugin_name":    "postgresql-database-plugin",
		"connection_url": fmt.Sprintf("postgresql://{{username}}:{{password}}@%s/%s?sslmode=disable", h.pg.TCPAddr(), testenv.Database),
		"username":       testenv.SuperUser,
		"password":       testenv.SuperPassword,
		"allowed_roles":  "*",
	})
	must(t, err)
	h.policy = "pgward-test-" + sfx
	must(t, adm.Sys().PutPolicy(h.policy, policyHCL(h.kvMount, h.dbMount)))
	t.Cleanup(func() { _ = adm.Sys().DeletePolicy(h.policy) })
}

var vaultAuthOptions = api.EnableAuthOptions{Type: "approle"}

// policyHCL is the policy docs/vault.md tells operators to give pgward.
func policyHCL(kvMount, dbMount string) string {
	return fmt.Sprintf(`
path "%[1]s/data/*" { capabilities = ["read"] }
path "%[2]s/creds/*" { capabilities = ["read"] }
path "sys/leases/renew" { capabilities = ["update"] }
path "sys/leases/revoke" { capabilities = ["update"] }
path "sys/leases/lookup" { capabilities = ["update"] }
path "auth/token/renew-self" { capabilities = ["update"] }
path "auth/token/lookup-self" { capabilities = ["read"] }
`, kvMount, dbMount)
}

func (h *harness) remember(s ...string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.secrets = append(h.secrets, s...)
}

// checkLogs fails the test if any secret the test handled was logged.
func (h *harness) checkLogs() {
	h.mu.Lock()
	defer h.mu.Unlock()
	logs := h.logs.String()
	for _, s := range h.secrets {
		if s != "" && strings.Contains(logs, s) {
			h.t.Errorf("a secret (%d bytes) appears in the log output", len(s))
		}
	}
	if h.t.Failed() {
		h.t.Logf("source log:\n%s", logs)
	}
}

// putKV writes a KV v2 secret version and returns its number.
func (h *harness) putKV(path string, data map[string]any) int {
	h.t.Helper()
	for _, v := range data {
		if s, ok := v.(string); ok {
			h.remember(s)
		}
	}
	if h.sim != nil {
		return h.sim.PutKV(h.kvMount, path, data)
	}
	var last error
	for range 50 { // a fresh kv-v2 mount upgrades itself for a moment
		sec, err := h.admin.KVv2(h.kvMount).Put(context.Background(), path, data)
		if err == nil {
			return sec.VersionMetadata.Version
		}
		last = err
		time.Sleep(100 * time.Millisecond)
	}
	h.t.Fatalf("kv put: %v", last)
	return 0
}

// dbRole describes a database engine role for the test.
type dbRole struct {
	creation []string
	ttl      time.Duration
	maxTTL   time.Duration
}

func (h *harness) addDBRole(name string, r dbRole) {
	h.t.Helper()
	if len(r.creation) == 0 {
		r.creation = []string{`CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';`}
	}
	if h.sim != nil {
		h.sim.AddDatabaseRole(h.dbMount, name, vaultsim.DatabaseRole{CreationStatements: r.creation, DefaultTTL: r.ttl, MaxTTL: r.maxTTL})
		return
	}
	_, err := h.admin.Logical().Write(h.dbMount+"/roles/"+name, map[string]any{
		"db_name":             "pg",
		"creation_statements": r.creation,
		"default_ttl":         r.ttl.String(),
		"max_ttl":             r.maxTTL.String(),
	})
	must(h.t, err)
}

// revokeInVault revokes a lease from Vault's side, as an operator would.
func (h *harness) revokeInVault(id string) {
	h.t.Helper()
	if h.sim != nil {
		must(h.t, h.sim.RevokeLease(id))
		return
	}
	must(h.t, h.admin.Sys().Revoke(id))
}

// tokenFile writes tok to a file of its own and returns the path.
func (h *harness) tokenFile(tok string) string {
	h.t.Helper()
	h.remember(tok)
	p := filepath.Join(h.t.TempDir(), "token")
	must(h.t, os.WriteFile(p, []byte(tok+"\n"), 0o600))
	return p
}

// pgwardToken is a token for pgward with the documented policy: the root
// token for the simulator (which has no ACLs), a fresh child token in real
// mode.
func (h *harness) pgwardToken(ttl time.Duration, renewable bool) string {
	h.t.Helper()
	if h.sim != nil {
		tok := "hvs.pgward-" + randHex(12)
		h.sim.AddToken(tok, vaultsim.TokenOptions{TTL: ttl, Renewable: renewable, Policies: []string{"pgward"}})
		return tok
	}
	req := &api.TokenCreateRequest{Policies: []string{h.policy}, Renewable: &renewable, ExplicitMaxTTL: "1h"}
	if ttl > 0 {
		req.TTL = ttl.String()
	}
	sec, err := h.admin.Auth().Token().Create(req)
	must(h.t, err)
	return sec.Auth.ClientToken
}

// config is a Config for this harness with token-file auth and fast lease
// checks; roles are set by the caller.
func (h *harness) config(roles map[string]map[string]vault.RoleConfig) vault.Config {
	return vault.Config{
		Address:            h.addr,
		Timeout:            2 * time.Second,
		Auth:               vault.AuthConfig{Method: vault.MethodToken, TokenFile: h.tokenFile(h.pgwardToken(0, false))},
		LeaseCheckInterval: time.Second,
		LeaseLinger:        200 * time.Millisecond,
		Roles:              roles,
	}
}

// source starts a Source logging at debug level into h.logs.
func (h *harness) source(cfg vault.Config) *vault.Source {
	h.t.Helper()
	log := slog.New(slog.NewJSONHandler(h.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	s, err := vault.New(cfg, log)
	if err != nil {
		h.t.Fatalf("vault.New: %v", err)
	}
	h.t.Cleanup(s.Close)
	return s
}

// createLogin creates a Postgres login role with a random password.
func (h *harness) createLogin(prefix string) (user, password string) {
	h.t.Helper()
	user, password = prefix+"_"+randHex(4), "pw-"+randHex(16)
	h.remember(password)
	must(h.t, h.pg.Exec(context.Background(), fmt.Sprintf(`CREATE ROLE %q LOGIN PASSWORD '%s'`, user, password)))
	return user, password
}

// connect logs in to the test Postgres; the caller closes the connection.
func (h *harness) connect(user, password string) (*pgx.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return pgx.Connect(ctx, h.pg.DSN(user, password, testenv.Database))
}

// roleExists reports whether a login role exists in the test Postgres.
func (h *harness) roleExists(name string) bool {
	h.t.Helper()
	conn, err := h.pg.Admin(context.Background())
	must(h.t, err)
	defer conn.Close(context.Background())
	var n int
	must(h.t, conn.QueryRow(context.Background(), `SELECT count(*) FROM pg_roles WHERE rolname = $1`, name).Scan(&n))
	return n > 0
}

// eventually polls cond until it holds or d passes.
func eventually(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("after %v: %s", d, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func randHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// closedAddr is the URL of a port nothing listens on.
func closedAddr(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	must(t, err)
	addr := ln.Addr().String()
	_ = ln.Close()
	return "http://" + addr
}
