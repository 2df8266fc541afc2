package broker

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/goleak"

	"github.com/pgward/pgward/broker/secrets"
	"github.com/pgward/pgward/testenv"
)

// The broker's end-to-end tests: a real Server on a Unix socket in front of
// a real PostgreSQL (testenv), real pgx clients, identity from the kernel's
// peer credentials, credentials from a map, and a recorder as the
// Observer: what the broker reported, as it reported it.

func TestMain(m *testing.M) {
	code := m.Run()
	testenv.StopShared() // the end-to-end tests' one Postgres (testenv.SharedPostgres)
	if code == 0 {
		// Sessions must leave nothing running behind them.
		if err := goleak.Find(goleak.IgnoreCurrent(), goleak.IgnoreAnyFunction("github.com/pgward/pgward/broker.(*eventLoop).run")); err != nil {
			fmt.Fprintf(os.Stderr, "goroutines left after the tests:\n%v\n", err)
			code = 1
		}
	}
	os.Exit(code)
}

// harness runs a Server against the shared Postgres.
type harness struct {
	t   *testing.T
	pg  *testenv.Postgres
	srv *Server
	dir string
	// secrets is upstream → role → password; a mutate func may change it.
	secrets map[string]map[string]string
	obs     *recorder
	logs    *testenv.SyncBuffer
	done    chan error
	cancel  context.CancelFunc
}

// newHarness starts a Server with upstream "orders" (the shared Postgres,
// SCRAM, MD5 and password roles granted to this process's uid) and "trap"
// (a socket that accepts and closes), after mutate had its say.
func newHarness(t *testing.T, mutate func(h *harness, c *Config)) *harness {
	t.Helper()
	pg := testenv.SharedPostgres(t)
	dir, err := os.MkdirTemp("", "pgwb-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	h := &harness{t: t, pg: pg, dir: dir, obs: newRecorder(), logs: &testenv.SyncBuffer{},
		secrets: map[string]map[string]string{
			"orders": {testenv.ScramUser: testenv.ScramPassword, testenv.MD5User: testenv.MD5Password, testenv.PasswordUser: testenv.PasswordPassword},
			"trap":   {testenv.ScramUser: testenv.ScramPassword},
		}}
	trap, err := net.Listen("unix", dir+"/trap.sock")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { trap.Close() })
	go func() {
		for {
			c, err := trap.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	me := uint32(os.Getuid())
	cfg := Config{
		Listen: ListenConfig{UnixDir: dir, Port: 5432},
		Upstreams: map[string]UpstreamConfig{
			"orders": {Address: pg.SocketPath(), Database: testenv.Database, Auth: []string{"scram-sha-256", "md5", "password"}},
			"trap":   {Address: dir + "/trap.sock"},
		},
		Principals: map[string]Principal{"me": {Match: Selectors{UID: []uint32{me}}}},
		Grants: []Grant{
			{Principal: "me", Upstream: "orders", Roles: []string{testenv.ScramUser, testenv.MD5User, testenv.PasswordUser}},
			{Principal: "me", Upstream: "trap", Roles: []string{testenv.ScramUser}},
		},
	}
	// make test runs the broker's suite a second time with every session
	// on the event loop (listen.event_loop, eventloop.go).
	cfg.Listen.EventLoop = os.Getenv("PGWARD_TEST_EVENT_LOOP") == "1"
	if mutate != nil {
		mutate(h, &cfg)
	}
	log := slog.New(slog.NewJSONHandler(h.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	srv, err := New(Options{Config: cfg, Resolver: IdentityResolverFunc(peerIdentity), Secrets: secrets.SourceFunc(h.fetch), Observer: h.obs, Logger: log})
	if err != nil {
		t.Fatalf("broker: %v", err)
	}
	h.srv = srv
	ln, err := ListenUnix(cfg.Listen)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	h.cancel = cancel
	h.done = make(chan error, 1)
	go func() { h.done <- srv.Serve(ctx, ln) }()
	t.Cleanup(h.stop)
	return h
}

func (h *harness) stop() {
	if h.cancel == nil {
		return
	}
	h.cancel()
	h.cancel = nil
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := h.srv.Shutdown(ctx); err != nil {
		h.t.Errorf("shutdown: %v", err)
	}
	if err := <-h.done; err != nil && !errors.Is(err, ErrServerClosed) {
		h.t.Errorf("serve: %v", err)
	}
}

func (h *harness) fetch(_ context.Context, upstream, role string) (secrets.Credential, error) {
	pw, ok := h.secrets[upstream][role]
	if !ok {
		return secrets.Credential{}, fmt.Errorf("%s/%s: %w", upstream, role, secrets.ErrNotFound)
	}
	return secrets.Credential{Password: secrets.NewSecret(pw)}, nil
}

// peerIdentity is the caller's identity from SO_PEERCRED alone.
func peerIdentity(_ context.Context, c net.Conn) (Identity, error) {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return Identity{}, fmt.Errorf("not a Unix connection: %T", c)
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return Identity{}, err
	}
	var cred *syscall.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = syscall.GetsockoptUcred(int(fd), syscall.SOL_SOCKET, syscall.SO_PEERCRED)
	}); err != nil {
		return Identity{}, err
	}
	if cerr != nil {
		return Identity{}, cerr
	}
	return Identity{PID: cred.Pid, UID: cred.Uid, GID: cred.Gid}, nil
}

// socketPath is the Server's socket.
func (h *harness) socketPath() string { return h.dir + "/.s.PGSQL.5432" }

func (h *harness) dsn(user, db string, extra ...string) string {
	return strings.Join(append([]string{"host=" + h.dir, "port=5432", "user=" + user, "dbname=" + db, "sslmode=disable", "connect_timeout=10"}, extra...), " ")
}

func (h *harness) connect(t *testing.T, user, db string, extra ...string) *pgx.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, h.dsn(user, db, extra...))
	if err != nil {
		t.Fatalf("connect %s@%s through the broker: %v", user, db, err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

// recorder is the harness's Observer: it keeps what the broker reported
// (copies: the broker recycles QueryEvents), and nothing else.
type recorder struct {
	mu       sync.Mutex
	sessions []*recSession
	refused  []AuthRequest
	cancels  []CancelEvent
}

// recSession is one started session as the broker reported it.
type recSession struct {
	rec     *recorder
	info    *SessionInfo
	start   SessionInfo // as it was at Started
	stmts   []QueryEvent
	staged  []QueryEvent // StageStatements, until CommitStatements
	results []QueryEvent
	ended   bool
	end     SessionInfo // as it was at End
}

func newRecorder() *recorder { return &recorder{} }

func (r *recorder) Begin(ctx context.Context, _ *Request) (context.Context, RequestObserver) {
	return ctx, recRequest{r}
}
func (r *recorder) Cancel(_ context.Context, c *CancelEvent) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.cancels = append(r.cancels, *c)
}
func (r *recorder) SlotRefused(context.Context, *SlotRefusal)       {}
func (r *recorder) CredentialRoles(string, string, RoleMemberships) {}

type recRequest struct{ r *recorder }

func (recRequest) StageStart(ctx context.Context, _ Stage) context.Context { return ctx }
func (recRequest) StageEnd(context.Context, Stage, error)                  {}
func (q recRequest) Refused(_ context.Context, a *AuthRequest, _ *SessionInfo) {
	q.r.mu.Lock()
	defer q.r.mu.Unlock()
	q.r.refused = append(q.r.refused, *a)
}
func (q recRequest) Started(_ context.Context, _ *AuthRequest, s *SessionInfo) (SessionObserver, error) {
	q.r.mu.Lock()
	defer q.r.mu.Unlock()
	rs := &recSession{rec: q.r, info: s, start: *s}
	q.r.sessions = append(q.r.sessions, rs)
	return rs, nil
}

// copyQuery keeps a QueryEvent past the Result call (Text and Params
// included).
func copyQuery(q *QueryEvent) QueryEvent {
	c := *q
	c.Text = strings.Clone(q.Text)
	c.Params = nil
	for _, p := range q.Params {
		p.Value = bytes.Clone(p.Value)
		c.Params = append(c.Params, p)
	}
	return c
}

func (s *recSession) Statements(ctx context.Context, qs []*QueryEvent) error {
	s.StageStatements(ctx, qs)
	return s.CommitStatements(ctx)
}

// StageStatements copies the statements (StatementStager: the event loop
// stages); CommitStatements records them.
func (s *recSession) StageStatements(_ context.Context, qs []*QueryEvent) {
	s.rec.mu.Lock()
	defer s.rec.mu.Unlock()
	for _, q := range qs {
		// Only the statement's own fields: the result fields are the
		// upstream pump's to fill, and may be written while this runs
		// (an ErrorResponse the server sends behind the login lands on
		// the first statement queued).
		c := QueryEvent{Index: q.Index, Statement: q.Statement, Portal: q.Portal,
			Extended: q.Extended, BindOnly: q.BindOnly, PortalUnverified: q.PortalUnverified,
			FunctionOID: q.FunctionOID, RoleChange: q.RoleChange, Start: q.Start, Text: q.Text, Params: q.Params}
		s.staged = append(s.staged, copyQuery(&c))
	}
}

func (s *recSession) CommitStatements(context.Context) error {
	s.rec.mu.Lock()
	defer s.rec.mu.Unlock()
	s.stmts = append(s.stmts, s.staged...)
	s.staged = s.staged[:0]
	return nil
}
func (s *recSession) Result(_ context.Context, q *QueryEvent) {
	s.rec.mu.Lock()
	defer s.rec.mu.Unlock()
	s.results = append(s.results, copyQuery(q))
}
func (s *recSession) Bytes(bool, int) {}
func (s *recSession) Cancel(_ context.Context, c *CancelEvent) {
	s.rec.mu.Lock()
	defer s.rec.mu.Unlock()
	s.rec.cancels = append(s.rec.cancels, *c)
}
func (s *recSession) End(context.Context) {
	s.rec.mu.Lock()
	defer s.rec.mu.Unlock()
	s.ended, s.end = true, *s.info
}

// started returns copies of the sessions started so far.
func (r *recorder) started() []recSession {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]recSession, len(r.sessions))
	for i, s := range r.sessions {
		out[i] = *s
		out[i].stmts = append([]QueryEvent(nil), s.stmts...)
		out[i].results = append([]QueryEvent(nil), s.results...)
	}
	return out
}

// eventually polls cond for up to 10 s.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitNoSessions waits until the Server has no session left.
func waitNoSessions(t *testing.T, h *harness) {
	t.Helper()
	eventually(t, "no active session", func() bool { return h.srv.ActiveSessions() == 0 })
}

// connectErr connects with dsn and returns the refusal's ErrorResponse.
func connectErr(t *testing.T, dsn string) *pgconn.PgError {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, dsn)
	if err == nil {
		c.Close(ctx)
		t.Fatalf("connect %q succeeded; want a refusal", dsn)
	}
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		t.Fatalf("connect %q: %v; want an ErrorResponse", dsn, err)
	}
	return pgErr
}
