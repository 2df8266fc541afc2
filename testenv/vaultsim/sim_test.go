package vaultsim_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"
	"go.uber.org/goleak"

	"github.com/pgward/pgward/testenv"
	"github.com/pgward/pgward/testenv/vaultsim"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// execLog records the SQL the database engine runs, in place of Postgres.
type execLog struct {
	mu    sync.Mutex
	stmts []string
}

func (l *execLog) exec(_ context.Context, sql string) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.stmts = append(l.stmts, sql)
	return nil
}

func (l *execLog) all() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.stmts, "\n")
}

func client(t *testing.T, s *vaultsim.Server, token string) *api.Client {
	t.Helper()
	c, err := api.NewClient(&api.Config{Address: s.Addr(), MaxRetries: 0})
	if err != nil {
		t.Fatal(err)
	}
	c.SetToken(token)
	return c
}

func status(err error) int {
	var re *api.ResponseError
	if errors.As(err, &re) {
		return re.StatusCode
	}
	return 0
}

func TestKV(t *testing.T) {
	s := vaultsim.New(vaultsim.Options{})
	defer s.Close()
	c := client(t, s, s.RootToken())
	ctx := context.Background()
	if v := s.PutKV("secret", "app/db", map[string]any{"password": "one"}); v != 1 {
		t.Fatalf("version %d", v)
	}
	w, err := c.KVv2("secret").Put(ctx, "app/db", map[string]any{"password": "two"})
	if err != nil || w.VersionMetadata.Version != 2 {
		t.Fatalf("put: %v %+v", err, w)
	}
	got, err := c.KVv2("secret").Get(ctx, "app/db")
	if err != nil || got.Data["password"] != "two" || got.VersionMetadata.Version != 2 {
		t.Fatalf("latest: %v %+v", err, got)
	}
	got, err = c.KVv2("secret").GetVersion(ctx, "app/db", 1)
	if err != nil || got.Data["password"] != "one" {
		t.Fatalf("version 1: %v %+v", err, got)
	}
	if _, err := c.KVv2("secret").Get(ctx, "app/none"); !errors.Is(err, api.ErrSecretNotFound) {
		t.Fatalf("missing: %v", err)
	}
	if _, err := c.KVv2("secret").GetVersion(ctx, "app/db", 9); !errors.Is(err, api.ErrSecretNotFound) {
		t.Fatalf("missing version: %v", err)
	}
	if _, err := client(t, s, "bogus").KVv2("secret").Get(ctx, "app/db"); status(err) != http.StatusForbidden {
		t.Fatalf("bad token: %v", err)
	}
	if n := s.Count("GET", "secret/data/app/db"); n != 4 {
		t.Fatalf("Count = %d", n)
	}
}

func TestFaultsAndSeal(t *testing.T) {
	s := vaultsim.New(vaultsim.Options{})
	defer s.Close()
	s.PutKV("secret", "a", map[string]any{"password": "p"})
	c := client(t, s, s.RootToken())
	ctx := context.Background()

	s.Seal()
	_, err := c.KVv2("secret").Get(ctx, "a")
	if status(err) != 503 || !strings.Contains(err.Error(), "Vault is sealed") {
		t.Fatalf("sealed: %v", err)
	}
	h, err := c.Sys().Health()
	if err != nil || !h.Sealed {
		t.Fatalf("health: %v %+v", err, h)
	}
	s.Unseal()

	remove := s.Inject(vaultsim.Fault{Path: "secret/", Status: 403})
	if _, err := c.KVv2("secret").Get(ctx, "a"); status(err) != 403 || !strings.Contains(err.Error(), "permission denied") {
		t.Fatalf("403: %v", err)
	}
	remove()
	s.Inject(vaultsim.Fault{Status: 500, Times: 1})
	if _, err := c.KVv2("secret").Get(ctx, "a"); status(err) != 500 {
		t.Fatalf("500 once: %v", err)
	}
	if _, err := c.KVv2("secret").Get(ctx, "a"); err != nil {
		t.Fatalf("after Times ran out: %v", err)
	}
	s.Inject(vaultsim.Fault{Delay: 5 * time.Second})
	tctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	if _, err := c.KVv2("secret").Get(tctx, "a"); err == nil || time.Since(start) > 2*time.Second {
		t.Fatalf("delay: %v after %v", err, time.Since(start))
	}
	s.ClearFaults()
}

func TestLogins(t *testing.T) {
	s := vaultsim.New(vaultsim.Options{})
	defer s.Close()
	s.AddAppRole("approle", vaultsim.AppRole{RoleID: "rid", SecretID: "sid",
		Token: vaultsim.TokenOptions{TTL: time.Minute, Renewable: true, Policies: []string{"pgward"}}})
	s.AddKubernetesRole("kubernetes", vaultsim.KubernetesRole{Name: "pgward", JWT: "jwt",
		Token: vaultsim.TokenOptions{TTL: time.Minute}})
	c := client(t, s, "")
	sec, err := c.Logical().Write("auth/approle/login", map[string]any{"role_id": "rid", "secret_id": "sid"})
	if err != nil || sec.Auth == nil || sec.Auth.ClientToken == "" || sec.Auth.LeaseDuration != 60 || !sec.Auth.Renewable {
		t.Fatalf("approle: %v %+v", err, sec)
	}
	if _, err := c.Logical().Write("auth/approle/login", map[string]any{"role_id": "rid", "secret_id": "x"}); status(err) != 400 {
		t.Fatalf("bad secret_id: %v", err)
	}
	tc := client(t, s, sec.Auth.ClientToken)
	self, err := tc.Auth().Token().LookupSelf()
	if err != nil || self.Data["renewable"] != true {
		t.Fatalf("lookup-self: %v %+v", err, self)
	}
	r, err := tc.Auth().Token().RenewSelf(30)
	if err != nil || r.Auth.LeaseDuration != 30 {
		t.Fatalf("renew-self: %v %+v", err, r)
	}
	k, err := c.Logical().Write("auth/kubernetes/login", map[string]any{"role": "pgward", "jwt": "jwt"})
	if err != nil || k.Auth.Renewable {
		t.Fatalf("kubernetes: %v %+v", err, k)
	}
	if _, err := client(t, s, k.Auth.ClientToken).Auth().Token().RenewSelf(0); status(err) != 400 {
		t.Fatalf("renew of a non-renewable token: %v", err)
	}
	if _, err := c.Logical().Write("auth/kubernetes/login", map[string]any{"role": "pgward", "jwt": "other"}); status(err) != 403 {
		t.Fatalf("bad jwt: %v", err)
	}
	s.RevokeToken(sec.Auth.ClientToken)
	if _, err := tc.Auth().Token().LookupSelf(); status(err) != 403 {
		t.Fatalf("revoked token: %v", err)
	}
}

func TestDatabaseLeases(t *testing.T) {
	var db execLog
	s := vaultsim.New(vaultsim.Options{Exec: db.exec})
	defer s.Close()
	s.AddDatabaseRole("database", "rw", vaultsim.DatabaseRole{
		CreationStatements: []string{`CREATE ROLE "{{name}}" LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';`, `GRANT x TO "{{name}}";`},
		DefaultTTL:         time.Minute, MaxTTL: 90 * time.Second,
	})
	c := client(t, s, s.RootToken())
	sec, err := c.Logical().Read("database/creds/rw")
	if err != nil || sec.LeaseID == "" || sec.LeaseDuration != 60 || !sec.Renewable {
		t.Fatalf("creds: %v %+v", err, sec)
	}
	user, pw := sec.Data["username"].(string), sec.Data["password"].(string)
	if !strings.HasPrefix(user, "v-rw-") || pw == "" {
		t.Fatalf("username %q", user)
	}
	if got := db.all(); !strings.Contains(got, `CREATE ROLE "`+user+`" LOGIN PASSWORD '`+pw+`' VALID UNTIL '`) ||
		!strings.Contains(got, `GRANT x TO "`+user+`"`) {
		t.Fatalf("creation SQL:\n%s", got)
	}
	r, err := c.Sys().Renew(sec.LeaseID, 3600)
	if err != nil || r.LeaseDuration > 90 || r.LeaseDuration < 80 {
		t.Fatalf("renew capped at max TTL: %v %+v", err, r)
	}
	if !strings.Contains(db.all(), `ALTER ROLE "`+user+`" VALID UNTIL`) {
		t.Fatal("renewal did not move VALID UNTIL")
	}
	lk, err := c.Sys().Lookup(sec.LeaseID)
	if err != nil || lk.Data["id"] != sec.LeaseID {
		t.Fatalf("lookup: %v %+v", err, lk)
	}
	if err := s.SetLeaseTTL(sec.LeaseID, time.Second); err != nil {
		t.Fatal(err)
	}
	if l := s.Leases(); len(l) != 1 || time.Until(l[0].Expire) > time.Second {
		t.Fatalf("leases: %+v", l)
	}
	deadline := time.Now().Add(3 * time.Second)
	for len(s.Leases()) > 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if len(s.Leases()) != 0 || !strings.Contains(db.all(), `DROP ROLE IF EXISTS "`+user+`"`) ||
		!strings.Contains(db.all(), `pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '`+user+`'`) {
		t.Fatalf("expiry did not drop the role:\n%s", db.all())
	}
	if _, err := c.Sys().Lookup(sec.LeaseID); status(err) != 400 {
		t.Fatalf("lookup of an expired lease: %v", err)
	}
	if _, err := c.Sys().Renew(sec.LeaseID, 0); status(err) != 400 {
		t.Fatalf("renew of an expired lease: %v", err)
	}

	sec2, err := c.Logical().Read("database/creds/rw")
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Sys().Revoke(sec2.LeaseID); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(db.all(), `DROP ROLE IF EXISTS "`+sec2.Data["username"].(string)+`"`) {
		t.Fatal("revoke did not drop the role")
	}
	if _, err := c.Logical().Read("database/creds/nope"); status(err) != 400 {
		t.Fatalf("unknown role: %v", err)
	}
	sec3, err := c.Logical().Read("database/creds/rw")
	if err != nil {
		t.Fatal(err)
	}
	s.Close() // drops what is left
	if !strings.Contains(db.all(), `DROP ROLE IF EXISTS "`+sec3.Data["username"].(string)+`"`) {
		t.Fatal("Close did not drop the outstanding role")
	}
}

// pki/issue/<role> issues a real certificate signed by the role's issuer,
// for the common name asked, with the ttl asked (capped), and refuses a
// common name the role does not allow.
func TestPKIIssue(t *testing.T) {
	ca, err := testenv.NewCA()
	if err != nil {
		t.Fatal(err)
	}
	s := vaultsim.New(vaultsim.Options{})
	defer s.Close()
	s.AddPKIRole("pki", "client", vaultsim.PKIRole{Issuer: ca, CAPEM: ca.CertPEM, MaxTTL: time.Minute, AllowedCommonNames: []string{"orders_rw"}})
	c, err := api.NewClient(&api.Config{Address: s.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	c.SetToken(s.RootToken())
	sec, err := c.Logical().Write("pki/issue/client", map[string]any{"common_name": "orders_rw", "ttl": "1h"})
	if err != nil {
		t.Fatal(err)
	}
	b, _ := pem.Decode([]byte(sec.Data["certificate"].(string)))
	leaf, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: ca.Pool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Fatalf("not signed by the CA: %v", err)
	}
	if leaf.Subject.CommonName != "orders_rw" || time.Until(leaf.NotAfter) > time.Minute+time.Second {
		t.Fatalf("CN %q, not after %v (want capped at 1m)", leaf.Subject.CommonName, leaf.NotAfter)
	}
	if _, err := tls.X509KeyPair([]byte(sec.Data["certificate"].(string)), []byte(sec.Data["private_key"].(string))); err != nil {
		t.Fatalf("key does not match: %v", err)
	}
	if got := s.Issued(); len(got) != 1 || got[0].Serial != leaf.SerialNumber.String() {
		t.Fatalf("issued %+v", got)
	}
	if _, err := c.Logical().Write("pki/issue/client", map[string]any{"common_name": "postgres"}); err == nil || !strings.Contains(err.Error(), "not allowed") {
		t.Fatalf("a common name the role does not allow: %v", err)
	}
}
