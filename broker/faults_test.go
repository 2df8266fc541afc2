package broker

import (
	"context"
	"crypto/tls"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgward/pgward/broker/secrets"
	"github.com/pgward/pgward/testenv"
	"github.com/pgward/pgward/testenv/faultpg"
)

// privatePG starts a Postgres of the test's own, for faults that would
// disturb the shared one. (It used to call testenv.Require, which starts
// a server, and then start a second one.)
func privatePG(t *testing.T, opts testenv.Options) *testenv.Postgres {
	t.Helper()
	return testenv.Require(t, opts)
}

// onPrivatePG points upstream "orders" at pg.
func onPrivatePG(pg *testenv.Postgres) func(*harness, *Config) {
	return func(h *harness, c *Config) {
		u := c.Upstreams["orders"]
		u.Address = pg.SocketPath()
		c.Upstreams["orders"] = u
	}
}

// queryThenFault runs a long query and applies fault while it runs; it
// returns the query's error.
func queryThenFault(t *testing.T, c *pgx.Conn, fault func() error) error {
	t.Helper()
	res := make(chan error, 1)
	go func() {
		_, err := c.Exec(context.Background(), "select pg_sleep(30)")
		res <- err
	}()
	time.Sleep(300 * time.Millisecond)
	if err := fault(); err != nil {
		t.Fatalf("fault: %v", err)
	}
	select {
	case err := <-res:
		return err
	case <-time.After(20 * time.Second):
		t.Fatal("the query outlived its upstream by 20s")
		return nil
	}
}

// The upstream restarted (fast shutdown) or killed mid-query: the client
// gets 57P01 or 08006, pgward stays up, and new sessions work afterwards.
func TestUpstreamRestartAndKillMidQuery(t *testing.T) {
	pg := privatePG(t, testenv.Options{})
	h := newHarness(t, onPrivatePG(pg))
	ctx := context.Background()
	works := func(when string) {
		t.Helper()
		c := h.connect(t, testenv.ScramUser, "orders")
		var n int
		if err := c.QueryRow(ctx, "select 41 + 1").Scan(&n); err != nil || n != 42 {
			t.Fatalf("new session %s: %d %v", when, n, err)
		}
		c.Close(ctx)
	}
	works("before the faults")

	c := h.connect(t, testenv.ScramUser, "orders")
	err := queryThenFault(t, c, func() error {
		rctx, cancel := context.WithTimeout(ctx, 60*time.Second)
		defer cancel()
		return pg.Restart(rctx)
	})
	if code := testenv.PgCode(err); code != CodeAdminShutdown {
		t.Fatalf("query across a restart: %v; want 57P01", err)
	}
	works("after the restart")

	c = h.connect(t, testenv.ScramUser, "orders")
	err = queryThenFault(t, c, pg.Kill)
	if code := testenv.PgCode(err); code != CodeConnectionFailure {
		t.Fatalf("query across a kill: %v; want 08006 from pgward", err)
	}
	// While the upstream is down, logins are refused promptly with 08001.
	start := time.Now()
	e := connectErr(t, h.dsn(testenv.ScramUser, "orders"))
	if e.Code != CodeCannotConnect || time.Since(start) > 6*time.Second {
		t.Fatalf("login with the upstream down: %s %q after %v", e.Code, e.Message, time.Since(start))
	}
	sctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	if err := pg.StartAgain(sctx); err != nil {
		t.Fatal(err)
	}
	works("after the kill and start")
	waitNoSessions(t, h)
	if h.srv.Draining() {
		t.Fatal("pgward is draining after upstream faults")
	}
}

// An upstream (or a machine in the middle) that answers the SSLRequest with
// 'S' followed by plaintext bytes (CVE-2021-23214/23222: an injected
// AuthenticationOk and ReadyForQuery) must not get a session: the login is
// aborted with 08001 and nothing is sent to it in the clear.
func TestUpstreamTLSInjectedBytesAbortLogin(t *testing.T) {
	ca, err := testenv.NewCA()
	if err != nil {
		t.Fatal(err)
	}
	certPEM, keyPEM, err := ca.Issue("localhost", "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(caFile, ca.CertPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	fake := faultpg.Start(t, faultpg.TLSInjection(cert, faultpg.AuthOKReady()))
	for _, mode := range []string{"require", "verify-full"} {
		t.Run(mode, func(t *testing.T) {
			before := fake.Accepted()
			h := newHarness(t, func(h *harness, c *Config) {
				c.Upstreams["trap"] = UpstreamConfig{Address: fake.Addr(), TLS: TLSConfig{Mode: mode, CAFile: caFile, ServerName: "localhost"}}
			})
			e := connectErr(t, h.dsn(testenv.ScramUser, "trap"))
			if e.Code != CodeCannotConnect {
				t.Fatalf("got %s %q; want 08001", e.Code, e.Message)
			}
			if fake.Accepted() == before {
				t.Fatal("the fake upstream was never dialled: the test proves nothing")
			}
			if got := fake.Startups(); len(got) != 0 {
				t.Fatalf("pgward sent %d startup packets to the injecting server", len(got))
			}
			if h.srv.ActiveSessions() != 0 {
				t.Fatal("a session exists")
			}
			if got := h.obs.started(); len(got) != 0 {
				t.Fatalf("a session was reported started: %+v", got[0].start)
			}
		})
	}
}

// stallSource never answers for upstream "orders" until its context ends;
// other upstreams get a fixed credential at once.
type stallSource struct{}

func (s *stallSource) Fetch(ctx context.Context, upstream, role string) (secrets.Credential, error) {
	if upstream == "orders" {
		<-ctx.Done()
		return secrets.Credential{}, fmt.Errorf("stalled backend: %w", ctx.Err())
	}
	return secrets.Credential{Password: secrets.NewSecret(testenv.ScramPassword)}, nil
}

// A secrets backend that hangs: the login is refused within
// listen.login_timeout, and another upstream served by a healthy backend
// keeps working meanwhile.
func TestSecretsBackendStallBounded(t *testing.T) {
	pg := testenv.SharedPostgres(t)
	dir := t.TempDir()
	cfg := Config{
		Listen: ListenConfig{UnixDir: dir, Port: 5432, LoginTimeout: 2 * time.Second},
		Upstreams: map[string]UpstreamConfig{
			"orders": {Address: pg.SocketPath(), Database: testenv.Database},
			"other":  {Address: pg.SocketPath(), Database: testenv.Database},
		},
		Principals: map[string]Principal{"me": {Match: Selectors{UID: []uint32{uint32(os.Getuid())}}}},
		Grants: []Grant{
			{Principal: "me", Upstream: "orders", Roles: []string{testenv.ScramUser}},
			{Principal: "me", Upstream: "other", Roles: []string{testenv.ScramUser}},
		},
	}
	obs := newRecorder()
	srv, err := New(Options{Config: cfg, Resolver: IdentityResolverFunc(peerIdentity), Secrets: &stallSource{}, Observer: obs})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := ListenUnix(cfg.Listen)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(context.Background(), ln) }()
	defer func() { srv.Close(); <-done }()
	dsn := func(db string) string {
		return fmt.Sprintf("host=%s port=5432 user=%s dbname=%s sslmode=disable connect_timeout=20", dir, testenv.ScramUser, db)
	}
	stalled := make(chan error, 1)
	start := time.Now()
	go func() {
		c, err := pgx.Connect(context.Background(), dsn("orders"))
		if err == nil {
			c.Close(context.Background())
		}
		stalled <- err
	}()
	// Meanwhile the other upstream works.
	for range 3 {
		c, err := pgx.Connect(context.Background(), dsn("other"))
		if err != nil {
			t.Fatalf("healthy backend's upstream during the stall: %v", err)
		}
		c.Close(context.Background())
	}
	select {
	case err := <-stalled:
		el := time.Since(start)
		if code := testenv.PgCode(err); code != CodeCannotConnect || el > 4*time.Second {
			t.Fatalf("stalled backend: %v after %v; want 08001 within login_timeout", err, el)
		}
		t.Logf("stalled backend refused after %v", el)
	case <-time.After(15 * time.Second):
		t.Fatal("a stalled secrets backend held the login for 15s")
	}
	obs.mu.Lock()
	defer obs.mu.Unlock()
	if len(obs.refused) != 1 || obs.refused[0].Cause != "credential fetch failed" || obs.refused[0].Upstream != "orders" {
		t.Fatalf("refusals reported: %+v, want the stalled fetch's", obs.refused)
	}
}
