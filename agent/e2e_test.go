package agent

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"go.opentelemetry.io/otel/trace"

	"github.com/pgward/pgward/broker"
	"github.com/pgward/pgward/broker/secrets"
	"github.com/pgward/pgward/exporter"
	"github.com/pgward/pgward/testenv"
)

// harness runs a whole agent against the shared Postgres.
type harness struct {
	t         *testing.T
	pg        *testenv.Postgres
	agent     *Agent
	dir       string
	auditPath string
	logs      *testenv.SyncBuffer
	trapConns *atomic.Int64
	tp        trace.TracerProvider // set by a mutate func to export spans
	logLevel  *slog.Level          // set by a mutate func; default debug
	done      chan error
	cancel    context.CancelFunc
}

const wrongPassword = "not-the-password"

func newHarness(t *testing.T, mutate func(h *harness, c *Config)) *harness {
	t.Helper()
	pg := testenv.SharedPostgres(t)
	dir, err := os.MkdirTemp("", "pgwa-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	h := &harness{t: t, pg: pg, dir: dir, auditPath: filepath.Join(dir, "audit.jsonl"), logs: &testenv.SyncBuffer{}, trapConns: &atomic.Int64{}}

	// A socket that stands for an upstream nobody should reach: it counts dials.
	trapPath := filepath.Join(dir, "trap.sock")
	trap, err := net.Listen("unix", trapPath)
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
			h.trapConns.Add(1)
			c.Close()
		}
	}()

	secretsPath := filepath.Join(dir, "secrets.yaml")
	sec := fmt.Sprintf(`orders:
  %[1]s: { password: %[2]s }
  %[3]s: { password: %[4]s }
  %[5]s: { password: %[6]s }
orders_tls:
  %[1]s: { password: %[2]s }
strict:
  %[3]s: { password: %[4]s }
wrongpw:
  %[1]s: { password: %[7]s }
trap:
  %[1]s: { password: %[2]s }
`, testenv.ScramUser, testenv.ScramPassword, testenv.MD5User, testenv.MD5Password,
		testenv.PasswordUser, testenv.PasswordPassword, wrongPassword)
	if err := os.WriteFile(secretsPath, []byte(sec), 0o600); err != nil {
		t.Fatal(err)
	}
	me := uint32(os.Getuid())
	cfg := &Config{
		Config: broker.Config{
			Listen: broker.ListenConfig{UnixDir: dir, Port: 5432},
			Upstreams: map[string]broker.UpstreamConfig{
				"orders":     {Address: pg.SocketPath(), Database: testenv.Database, Auth: []string{"scram-sha-256", "md5", "password"}},
				"orders_tls": {Address: pg.TCPAddr(), Database: testenv.Database, TLS: broker.TLSConfig{Mode: "verify-full", CAFile: pg.CAFile, ServerName: "localhost"}},
				"strict":     {Address: pg.SocketPath(), Database: testenv.Database},
				"wrongpw":    {Address: pg.SocketPath(), Database: testenv.Database},
				"trap":       {Address: trapPath},
			},
			Principals: map[string]broker.Principal{
				"me":       {Match: broker.Selectors{UID: []uint32{me}}},
				"me-exe":   {Match: broker.Selectors{UID: []uint32{me}, Exe: broker.StringList{"/nonexistent/bin/*"}}},
				"stranger": {Match: broker.Selectors{UID: []uint32{61234}}},
			},
			Grants: []broker.Grant{
				{Principal: "me", Upstream: "orders", Roles: []string{testenv.ScramUser, testenv.MD5User, testenv.PasswordUser}},
				{Principal: "me", Upstream: "orders_tls", Roles: []string{testenv.ScramUser}},
				{Principal: "me", Upstream: "strict", Roles: []string{testenv.MD5User}},
				{Principal: "me", Upstream: "wrongpw", Roles: []string{testenv.ScramUser}},
				{Principal: "me", Upstream: "trap", Roles: []string{testenv.ScramUser}},
				{Principal: "me-exe", Upstream: "orders", Roles: []string{testenv.ScramUser}},
			},
		},
		Secrets: SecretsConfig{Backend: "file", File: secrets.FileConfig{Path: secretsPath}},
		Audit:   exporter.AuditConfig{Path: h.auditPath, Durability: exporter.DurabilityWrite, Parameters: exporter.ParamsFull},
		Metrics: MetricsConfig{Listen: "127.0.0.1:0"},
		EBPF:    EBPFConfig{Enabled: "false"},
	}
	// make test's event-loop step runs this suite again with every session
	// on the event loop (listen.event_loop), where fsync allows it.
	cfg.Listen.EventLoop = os.Getenv("PGWARD_TEST_EVENT_LOOP") == "1"
	if mutate != nil {
		mutate(h, cfg)
	}
	if cfg.Audit.Durability == exporter.DurabilityFsync {
		cfg.Listen.EventLoop = false
	}
	if err := cfg.Validate(); err != nil {
		t.Fatalf("test config invalid: %v", err)
	}
	level := slog.LevelDebug
	if h.logLevel != nil {
		level = *h.logLevel
	}
	log := slog.New(slog.NewJSONHandler(h.logs, &slog.HandlerOptions{Level: level}))
	a, err := New(context.Background(), Options{Config: cfg, Logger: log, TracerProvider: h.tp})
	if err != nil {
		t.Fatalf("agent: %v", err)
	}
	h.agent = a
	ctx, cancel := context.WithCancel(context.Background())
	h.cancel = cancel
	h.done = make(chan error, 1)
	go func() { h.done <- a.Run(ctx) }()
	t.Cleanup(h.stop)
	return h
}

func (h *harness) stop() {
	if h.cancel == nil {
		return
	}
	h.cancel()
	h.cancel = nil
	select {
	case err := <-h.done:
		if err != nil {
			h.t.Errorf("agent run: %v", err)
		}
	case <-time.After(40 * time.Second):
		h.t.Error("agent did not stop")
	}
}

func (h *harness) dsn(user, db string, extra ...string) string {
	return strings.Join(append([]string{"host=" + h.dir, "port=5432", "user=" + user, "dbname=" + db, "sslmode=disable", "connect_timeout=10"}, extra...), " ")
}

func (h *harness) connect(t *testing.T, user, db string, extra ...string) *pgx.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, h.dsn(user, db, extra...))
	if err != nil {
		t.Fatalf("connect %s@%s through pgward: %v", user, db, err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

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

func (h *harness) auditEvents(t *testing.T) []map[string]any {
	t.Helper()
	f, err := os.Open(h.auditPath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []map[string]any
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 64<<20)
	for sc.Scan() {
		var ev map[string]any
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			t.Fatalf("audit line is not JSON: %v: %s", err, sc.Text())
		}
		out = append(out, ev)
	}
	return out
}

func TestLoginWithoutPassword(t *testing.T) {
	h := newHarness(t, nil)
	ctx := context.Background()
	for _, tc := range []struct{ user, db string }{
		{testenv.ScramUser, "orders"},
		{testenv.MD5User, "orders"},
		{testenv.PasswordUser, "orders"},
		{testenv.ScramUser, "orders_tls"},
	} {
		t.Run(tc.user+"@"+tc.db, func(t *testing.T) {
			c := h.connect(t, tc.user, tc.db)
			var who, db string
			if err := c.QueryRow(ctx, "select current_user, current_database()").Scan(&who, &db); err != nil {
				t.Fatal(err)
			}
			if who != tc.user || db != testenv.Database {
				t.Fatalf("session is %s@%s", who, db)
			}
			var ssl bool
			if err := c.QueryRow(ctx, "select coalesce((select ssl from pg_stat_ssl where pid = pg_backend_pid()), false)").Scan(&ssl); err != nil {
				t.Fatal(err)
			}
			if want := tc.db == "orders_tls"; ssl != want {
				t.Fatalf("upstream TLS = %v, want %v", ssl, want)
			}
			// BackendKeyData carries the upstream pid, as drivers expect.
			var pid uint32
			if err := c.QueryRow(ctx, "select pg_backend_pid()").Scan(&pid); err != nil {
				t.Fatal(err)
			}
			if pid != c.PgConn().PID() {
				t.Fatalf("BackendKeyData pid %d, backend pid %d", c.PgConn().PID(), pid)
			}
		})
	}
}

// The TLS upstream is verify-full with SCRAM only, which makes pgward insist
// on SCRAM-SHA-256-PLUS: a server certificate for another name must fail.
func TestTLSVerifyFullAndChannelBinding(t *testing.T) {
	h := newHarness(t, func(h *harness, c *Config) {
		u := c.Upstreams["orders_tls"]
		u.TLS.ServerName = "not-the-server.example"
		c.Upstreams["orders_tls"] = u
	})
	e := connectErr(t, h.dsn(testenv.ScramUser, "orders_tls"))
	if e.Code != broker.CodeCannotConnect {
		t.Fatalf("wrong server name: %s %s", e.Code, e.Message)
	}
}

func TestAuthMethodDowngradeRefused(t *testing.T) {
	h := newHarness(t, nil)
	// "strict" allows only SCRAM; the server asks md5 of md5_user.
	e := connectErr(t, h.dsn(testenv.MD5User, "strict"))
	if e.Code != broker.CodeCannotConnect || !strings.Contains(e.Message, "authentication method") {
		t.Fatalf("got %s %q", e.Code, e.Message)
	}
}

func TestRefusals(t *testing.T) {
	h := newHarness(t, nil)
	tests := []struct {
		name, dsn, code, msg string
	}{
		{"unknown upstream", h.dsn(testenv.ScramUser, "nope"), broker.CodeUnknownDatabase, `no upstream named "nope"`},
		{"no grant for role", h.dsn("postgres", "orders"), broker.CodeInvalidAuthorization, `use role "postgres" on upstream "orders"`},
		{"wrong stored password", h.dsn(testenv.ScramUser, "wrongpw"), broker.CodeInvalidPassword, "rejected the credential"},
		{"claim mismatch", h.dsn(testenv.ScramUser, "orders", "options='-c pgward.principal=stranger'"), broker.CodeInvalidAuthorization, `does not match claimed principal "stranger"`},
		{"claim of principal whose exe does not match", h.dsn(testenv.ScramUser, "orders", "options='-c pgward.principal=me-exe'"), broker.CodeInvalidAuthorization, "does not match claimed principal"},
		{"role change in options", h.dsn(testenv.ScramUser, "orders", "options='-c role=postgres'"), broker.CodeInsufficientPriv, `"role" is not allowed`},
		{"session_authorization in options", h.dsn(testenv.ScramUser, "orders", "options='--session-authorization=postgres'"), broker.CodeInsufficientPriv, "session_authorization"},
		{"replication", h.dsn(testenv.ScramUser, "orders", "replication=database"), broker.CodeInvalidAuthorization, "replication"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := connectErr(t, tt.dsn)
			if e.Code != tt.code || !strings.Contains(e.Message, tt.msg) {
				t.Fatalf("got %s %q, want %s containing %q", e.Code, e.Message, tt.code, tt.msg)
			}
			if strings.Contains(e.Message, wrongPassword) || strings.Contains(e.Message, testenv.ScramPassword) {
				t.Fatal("a secret reached the client")
			}
		})
	}
	// The unknown dbname is audited with the name the client asked for.
	found := false
	for _, ev := range h.auditEvents(t) {
		if ev["event"] == "db.session.start" && ev["success"] == false && strings.Contains(fmt.Sprint(ev["error"]), `no upstream named "nope"`) {
			found = true
			if ev["db_service"] != "nope" || ev["db_name"] != "nope" {
				t.Errorf("unknown dbname audited as db_service %v, db_name %v; want the name asked for, nope", ev["db_service"], ev["db_name"])
			}
		}
	}
	if !found {
		t.Error("the unknown dbname was not audited")
	}
	// A matching claim is accepted and stripped before forwarding.
	c := h.connect(t, testenv.ScramUser, "orders", "options='-c pgward.principal=me -c search_path=public'")
	var sp string
	if err := c.QueryRow(context.Background(), "show search_path").Scan(&sp); err != nil || sp != "public" {
		t.Fatalf("search_path %q %v", sp, err)
	}
	if out := h.logs.String(); strings.Contains(out, wrongPassword) || strings.Contains(out, testenv.ScramPassword) {
		t.Fatal("a secret reached the log")
	}
}

// A process running as a uid without a grant is refused, and pgward never
// dials the upstream on its behalf.
func TestUngrantedUIDRefusedBeforeUpstream(t *testing.T) {
	testenv.RequireRoot(t)
	h := newHarness(t, nil)
	uids := testenv.UnprivilegedIDs(t, 1)
	out, err := testenv.RunAs(uids[0], uids[0], "psql", h.dsn(testenv.ScramUser, "trap"), "-Atc", "select 1").CombinedOutput()
	if err == nil {
		t.Fatalf("psql as uid %d succeeded: %s", uids[0], out)
	}
	want := fmt.Sprintf("no grant lets uid %d", uids[0])
	if !strings.Contains(string(out), want) {
		t.Fatalf("psql said %q, want %q", out, want)
	}
	if n := h.trapConns.Load(); n != 0 {
		t.Fatalf("upstream dialled %d times for a refused caller", n)
	}
	// The same upstream is dialled for a granted caller (the trap hangs up).
	_ = connectErr(t, h.dsn(testenv.ScramUser, "trap"))
	if h.trapConns.Load() == 0 {
		t.Fatal("trap upstream never dialled: the test proves nothing")
	}
	// And psql as root (granted) works end to end.
	out, err = testenv.RunAs(0, 0, "psql", h.dsn(testenv.ScramUser, "orders"), "-Atc", "select current_user").CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != testenv.ScramUser {
		t.Fatalf("psql: %v %s", err, out)
	}
}

func TestCancel(t *testing.T) {
	h := newHarness(t, nil)
	c := h.connect(t, testenv.ScramUser, "orders")
	// pgx's cancel: PgConn.CancelRequest dials the same socket with the
	// BackendKeyData pgward handed out.
	// The cancel goes once the server runs the statement (a cancel that
	// overtakes it is ignored, and the sleep runs its 20 s).
	backend := testenv.BackendPID(t, c)
	start := time.Now()
	go func() {
		if err := h.pg.CancelWhenRunning(c, backend, "select pg_sleep(20)"); err != nil {
			t.Errorf("cancel request: %v", err)
		}
	}()
	_, err := c.Exec(context.Background(), "select pg_sleep(20)")
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "57014" {
		t.Fatalf("pg_sleep: %v; want 57014 query_canceled", err)
	}
	if el := time.Since(start); el > 5*time.Second {
		t.Fatalf("cancel took %v", el)
	}

	// A forged key cancels nothing.
	c2 := h.connect(t, testenv.ScramUser, "orders")
	res := make(chan error, 1)
	go func() {
		_, err := c2.Exec(context.Background(), "select pg_sleep(1)")
		res <- err
	}()
	time.Sleep(200 * time.Millisecond)
	for i := range 50 {
		if err := testenv.SendCancel("unix", h.agent.SocketPath(), c2.PgConn().PID(), uint32(i)*7919+1); err != nil {
			t.Fatal(err)
		}
	}
	if err := <-res; err != nil {
		t.Fatalf("a forged cancel key cancelled the query: %v", err)
	}
	if !strings.Contains(h.logs.String(), "cancel request with an unknown key") {
		t.Fatal("forged cancel not logged")
	}
}

func TestSessionSemantics(t *testing.T) {
	h := newHarness(t, nil)
	ctx := context.Background()
	c := h.connect(t, testenv.ScramUser, "orders")
	if _, err := c.Exec(ctx, "drop table if exists copytest; create table copytest (id int, name text, note text)"); err != nil {
		t.Fatal(err)
	}

	t.Run("copy 100k rows in and out byte-identical", func(t *testing.T) {
		var in bytes.Buffer
		for i := range 100000 {
			fmt.Fprintf(&in, "%d\tname-%d\tnote with\\ttab and unicode é %d\n", i, i, i*i)
		}
		tag, err := c.PgConn().CopyFrom(ctx, bytes.NewReader(in.Bytes()), "copy copytest from stdin")
		if err != nil || tag.RowsAffected() != 100000 {
			t.Fatalf("copy in: %v %v", tag, err)
		}
		var out bytes.Buffer
		tag, err = c.PgConn().CopyTo(ctx, &out, "copy (select * from copytest order by id) to stdout")
		if err != nil || tag.RowsAffected() != 100000 {
			t.Fatalf("copy out: %v %v", tag, err)
		}
		if !bytes.Equal(in.Bytes(), out.Bytes()) {
			t.Fatalf("copy out differs: %d bytes in, %d out", in.Len(), out.Len())
		}
	})

	t.Run("10 MB result", func(t *testing.T) {
		var s string
		if err := c.QueryRow(ctx, "select repeat('x', 10*1024*1024)").Scan(&s); err != nil || len(s) != 10<<20 {
			t.Fatalf("len %d %v", len(s), err)
		}
		var sum int64
		if err := c.QueryRow(ctx, "select sum(length(repeat('y', g))) from generate_series(1, 4000) g").Scan(&sum); err != nil || sum != 4000*4001/2 {
			t.Fatalf("sum %d %v", sum, err)
		}
	})

	t.Run("prepared statements", func(t *testing.T) {
		if _, err := c.Prepare(ctx, "add", "select $1::int + $2::int"); err != nil {
			t.Fatal(err)
		}
		for i := range 20 {
			var n int
			if err := c.QueryRow(ctx, "add", i, 1).Scan(&n); err != nil || n != i+1 {
				t.Fatalf("%d: %d %v", i, n, err)
			}
		}
		// An error inside the extended protocol does not break the session.
		if _, err := c.Exec(ctx, "select 1/$1::int", 0); err == nil {
			t.Fatal("division by zero succeeded")
		}
		var one int
		if err := c.QueryRow(ctx, "select $1::int", 1).Scan(&one); err != nil || one != 1 {
			t.Fatalf("after error: %d %v", one, err)
		}
	})

	t.Run("transactions", func(t *testing.T) {
		tx, err := c.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := tx.Exec(ctx, "insert into copytest values (-1, 'rolled back', '')"); err != nil {
			t.Fatal(err)
		}
		if err := tx.Rollback(ctx); err != nil {
			t.Fatal(err)
		}
		tx, _ = c.Begin(ctx)
		if _, err := tx.Exec(ctx, "insert into copytest values (-2, 'committed', '')"); err != nil {
			t.Fatal(err)
		}
		if err := tx.Commit(ctx); err != nil {
			t.Fatal(err)
		}
		var n int
		_ = c.QueryRow(ctx, "select count(*) from copytest where id < 0").Scan(&n)
		if n != 1 {
			t.Fatalf("rows with id<0: %d, want 1 (the committed one)", n)
		}
	})

	t.Run("listen notify", func(t *testing.T) {
		l := h.connect(t, testenv.ScramUser, "orders")
		if _, err := l.Exec(ctx, "listen pgward_ch"); err != nil {
			t.Fatal(err)
		}
		s := h.connect(t, testenv.ScramUser, "orders")
		if _, err := s.Exec(ctx, "select pg_notify('pgward_ch', 'hello')"); err != nil {
			t.Fatal(err)
		}
		wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		n, err := l.WaitForNotification(wctx)
		if err != nil {
			t.Fatal(err)
		}
		if n.Payload != "hello" || n.PID != s.PgConn().PID() {
			t.Fatalf("notification %+v, sender pid %d", n, s.PgConn().PID())
		}
	})

	t.Run("startup parameters forwarded", func(t *testing.T) {
		c := h.connect(t, testenv.ScramUser, "orders", "application_name=billing-worker", "timezone=Asia/Tokyo")
		var app, tz string
		if err := c.QueryRow(ctx, "select current_setting('application_name'), current_setting('TimeZone')").Scan(&app, &tz); err != nil {
			t.Fatal(err)
		}
		// pgward adds its part to the upstream's application_name (upstreams.<name>.application_name).
		if !strings.HasPrefix(app, "billing-worker pgward:me:") || tz != "Asia/Tokyo" {
			t.Fatalf("application_name %q TimeZone %q", app, tz)
		}
	})

	t.Run("terminated backend ends the client session cleanly", func(t *testing.T) {
		victim := h.connect(t, testenv.ScramUser, "orders")
		admin, err := h.pg.Admin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer admin.Close(ctx)
		if _, err := admin.Exec(ctx, "select pg_terminate_backend($1)", int(victim.PgConn().PID())); err != nil {
			t.Fatal(err)
		}
		_, err = victim.Exec(ctx, "select 1")
		if err == nil {
			t.Fatal("query on a terminated session succeeded")
		}
	})

	// Audit: every query has its event, with the process that ran it.
	evs := h.auditEvents(t)
	var starts, queries int
	for _, ev := range evs {
		switch ev["event"] {
		case "db.session.start":
			starts++
			if p, ok := ev["process"].(map[string]any); !ok || p["pid"] == nil {
				t.Errorf("session start without process: %v", ev)
			}
		case "db.session.query":
			queries++
		}
	}
	if starts < 5 || queries < 20 {
		t.Fatalf("audit has %d session starts and %d queries", starts, queries)
	}
}

// Clients leave: upstream sessions end too.
func TestNoLeftoverUpstreamSessions(t *testing.T) {
	h := newHarness(t, nil)
	ctx := context.Background()
	admin, err := h.pg.Admin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(ctx)
	for range 10 {
		c, err := pgx.Connect(ctx, h.dsn(testenv.ScramUser, "orders", "application_name=leftover-check"))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Exec(ctx, "select 1"); err != nil {
			t.Fatal(err)
		}
		c.Close(ctx)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		var n int
		if err := admin.QueryRow(ctx, "select count(*) from pg_stat_activity where application_name like 'leftover-check pgward:%'").Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d upstream sessions left after their clients closed", n)
		}
		time.Sleep(50 * time.Millisecond)
	}
	// pgward ends its side right after the upstream's: give it the same bound.
	for h.agent.Broker().ActiveSessions() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d sessions still active", h.agent.Broker().ActiveSessions())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestManyConcurrentSessions(t *testing.T) {
	h := newHarness(t, nil)
	var wg sync.WaitGroup
	errs := make(chan error, 40)
	for i := range 40 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx := context.Background()
			c, err := pgx.Connect(ctx, h.dsn(testenv.ScramUser, "orders"))
			if err != nil {
				errs <- err
				return
			}
			defer c.Close(ctx)
			for j := range 20 {
				var n int
				if err := c.QueryRow(ctx, "select $1::int * 2", i*100+j).Scan(&n); err != nil || n != 2*(i*100+j) {
					errs <- fmt.Errorf("query: %d %v", n, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func httpGet(t *testing.T, url string) []byte {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
