package broker

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgward/pgward/testenv"
)

func reuseHarness(t *testing.T) *harness {
	return newHarness(t, func(h *harness, c *Config) {
		u := c.Upstreams["orders"]
		u.Reuse = &ReuseConfig{MaxIdle: 2, IdleTimeout: time.Minute}
		c.Upstreams["orders"] = u
	})
}

// waitIdle waits until n upstream connections are parked.
func waitIdle(t *testing.T, h *harness, n int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for h.srv.reuse.idle() != n {
		if time.Now().After(deadline) {
			t.Fatalf("%d upstream connections parked, want %d", h.srv.reuse.idle(), n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestReuseResetsSession: the second session gets the first one's backend,
// with nothing of the first session left and the second one's parameters.
func TestReuseResetsSession(t *testing.T) {
	h := reuseHarness(t)
	ctx := context.Background()

	a, err := pgx.Connect(ctx, h.dsn(testenv.ScramUser, "orders", "application_name=session-a", "search_path=pg_catalog"))
	if err != nil {
		t.Fatal(err)
	}
	pidA := testenv.BackendPID(t, a)
	for _, q := range []string{
		"create temp table leftover (x int)",
		"prepare leftover_stmt as select 1",
		"set work_mem = '7MB'",
		"listen leftover_channel",
		"select pg_advisory_lock(4242)",
	} {
		if _, err := a.Exec(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	if a.PgConn().PID() != pidA {
		t.Fatalf("BackendKeyData pid %d, pg_backend_pid %d", a.PgConn().PID(), pidA)
	}
	a.Close(ctx)
	waitIdle(t, h, 1)

	b, err := pgx.Connect(ctx, h.dsn(testenv.ScramUser, "orders", "application_name=session-b"))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close(ctx)
	if pid := testenv.BackendPID(t, b); pid != pidA {
		t.Fatalf("session B on backend %d, want A's %d (reuse)", pid, pidA)
	}
	if b.PgConn().PID() != pidA {
		t.Fatalf("BackendKeyData pid %d, want %d", b.PgConn().PID(), pidA)
	}
	if got := b.PgConn().ParameterStatus("application_name"); got != "session-b" {
		t.Errorf("ParameterStatus application_name %q, want session-b", got)
	}
	checks := map[string]string{
		"select coalesce(to_regclass('pg_temp.leftover')::text, 'gone')":                             "gone",
		"select count(*)::text from pg_prepared_statements where name = 'leftover_stmt'":             "0",
		"select current_setting('work_mem')":                                                         "4MB",
		"select split_part(current_setting('application_name'), ' ', 1)":                             "session-b",
		"select current_setting('search_path')":                                                      `"$user", public`,
		"select count(*)::text from pg_listening_channels()":                                         "0",
		"select count(*)::text from pg_locks where locktype = 'advisory' and pid = pg_backend_pid()": "0",
	}
	for q, want := range checks {
		var got string
		if err := b.QueryRow(ctx, q, pgx.QueryExecModeSimpleProtocol).Scan(&got); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
		if got != want {
			t.Errorf("%s = %q, want %q (left over from session A?)", q, got, want)
		}
	}
	// What the broker reports stays per client session.
	var sids = map[string]bool{}
	for _, s := range h.obs.started() {
		sids[s.start.SessionID] = true
	}
	if len(sids) != 2 {
		t.Errorf("%d started session ids, want 2", len(sids))
	}
}

// TestReuseCancel: a cancel on a reused connection reaches its backend.
func TestReuseCancel(t *testing.T) {
	h := reuseHarness(t)
	ctx := context.Background()
	a, err := pgx.Connect(ctx, h.dsn(testenv.ScramUser, "orders"))
	if err != nil {
		t.Fatal(err)
	}
	pidA := testenv.BackendPID(t, a)
	keyA := a.PgConn().SecretKey()
	a.Close(ctx)
	waitIdle(t, h, 1)

	b, err := pgx.Connect(ctx, h.dsn(testenv.ScramUser, "orders"))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close(ctx)
	if b.PgConn().PID() != pidA {
		t.Fatalf("not reused: pid %d, want %d", b.PgConn().PID(), pidA)
	}
	if string(b.PgConn().SecretKey()) == string(keyA) {
		t.Errorf("session B got session A's cancel secret")
	}
	go func() {
		if err := h.pg.CancelWhenRunning(b, pidA, "select pg_sleep(20)"); err != nil {
			t.Errorf("cancel request: %v", err)
		}
	}()
	start := time.Now()
	_, err = b.Exec(ctx, "select pg_sleep(20)")
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "57014" {
		t.Fatalf("cancelled statement: %v, want SQLSTATE 57014", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("cancel took %v", d)
	}
	if _, err := b.Exec(ctx, "select 1"); err != nil {
		t.Fatalf("after cancel: %v", err)
	}
}

// TestReuseTerminatedParkedBackend: a parked backend killed by an admin
// does not fail the next client: pgward dials a fresh one.
func TestReuseTerminatedParkedBackend(t *testing.T) {
	h := reuseHarness(t)
	ctx := context.Background()
	admin, err := h.pg.Admin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(ctx)

	a, err := pgx.Connect(ctx, h.dsn(testenv.ScramUser, "orders"))
	if err != nil {
		t.Fatal(err)
	}
	pidA := testenv.BackendPID(t, a)
	a.Close(ctx)
	waitIdle(t, h, 1)
	var ok bool
	if err := admin.QueryRow(ctx, "select pg_terminate_backend($1)", int(pidA)).Scan(&ok); err != nil || !ok {
		t.Fatalf("terminate parked backend: %v %v", ok, err)
	}
	time.Sleep(100 * time.Millisecond)

	b, err := pgx.Connect(ctx, h.dsn(testenv.ScramUser, "orders"))
	if err != nil {
		t.Fatalf("connect after the parked backend was terminated: %v", err)
	}
	defer b.Close(ctx)
	if _, err := b.Exec(ctx, "select 1"); err != nil {
		t.Fatalf("%v\n%s", err, h.logs.String())
	}
	if pid := testenv.BackendPID(t, b); pid == pidA {
		t.Fatalf("session on the terminated backend %d", pid)
	}
	waitIdle(t, h, 0)
}

// TestReuseIdleBound: max_idle bounds parked connections per key.
func TestReuseIdleBound(t *testing.T) {
	h := reuseHarness(t)
	ctx := context.Background()
	var conns []*pgx.Conn
	for range 4 {
		c, err := pgx.Connect(ctx, h.dsn(testenv.ScramUser, "orders"))
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	for _, c := range conns {
		c.Close(ctx)
	}
	time.Sleep(300 * time.Millisecond)
	waitIdle(t, h, 2)
}
