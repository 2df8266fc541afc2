package agent

import (
	"context"
	"fmt"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgward/pgward/broker"
	"github.com/pgward/pgward/testenv"
)

// Issue 14, point 1: startup parameters reach the server as they would
// directly, and the server's refusal of one reaches the client.

func show(t *testing.T, c *pgx.Conn, name string) string {
	t.Helper()
	var v string
	if err := c.QueryRow(context.Background(), "show "+name, pgx.QueryExecModeSimpleProtocol).Scan(&v); err != nil {
		t.Fatalf("show %s: %v", name, err)
	}
	return v
}

// directErr connects to the server directly with the same extra
// parameters and returns its refusal, to compare pgward's with.
func directErr(t *testing.T, pg *testenv.Postgres, extra string) *pgconn.PgError {
	t.Helper()
	return connectErr(t, pg.DSN(testenv.ScramUser, testenv.ScramPassword, testenv.Database)+" "+extra)
}

// TestStartupParamsForwarded: GUCs given as startup parameters take effect
// in the session (they were dropped before).
func TestStartupParamsForwarded(t *testing.T) {
	h := newHarness(t, nil)
	c := h.connect(t, testenv.ScramUser, "orders", "default_transaction_read_only=on", "work_mem=1234kB", "lock_timeout=7s")
	if v := show(t, c, "transaction_read_only"); v != "on" {
		t.Errorf("transaction_read_only = %q through pgward with default_transaction_read_only=on, want on", v)
	}
	if v := show(t, c, "work_mem"); v != "1234kB" {
		t.Errorf("work_mem = %q, want 1234kB", v)
	}
	if v := show(t, c, "lock_timeout"); v != "7s" {
		t.Errorf("lock_timeout = %q, want 7s", v)
	}
	_, err := c.Exec(context.Background(), "create temp table t14 (i int)")
	if code := testenv.PgCode(err); code != "25006" {
		t.Errorf("create table in a read-only session: %v (SQLSTATE %q), want 25006", err, code)
	}

	// 1s, not 1ms: under 1ms a backend descheduled on a loaded machine
	// cancels any statement, the harness's own among them.
	st := h.connect(t, testenv.ScramUser, "orders", "statement_timeout=1s")
	_, err = st.Exec(context.Background(), "select pg_sleep(10)")
	if code := testenv.PgCode(err); code != "57014" {
		t.Errorf("pg_sleep(10) with statement_timeout=1s: %v (SQLSTATE %q), want 57014", err, code)
	}
}

// TestStartupParamRefusedAsDirectly: a parameter the server refuses is
// refused through pgward with the server's SQLSTATE and message.
func TestStartupParamRefusedAsDirectly(t *testing.T) {
	h := newHarness(t, nil)
	for _, extra := range []string{
		"nosuch_param=1",                      // 42704 unrecognized configuration parameter
		"statement_timeout=banana",            // 22023 invalid value
		"default_transaction_read_only=maybe", // 22023
		"server_version=1",                    // 55P02 cannot be changed
	} {
		t.Run(extra, func(t *testing.T) {
			want := directErr(t, h.pg, extra)
			got := connectErr(t, h.dsn(testenv.ScramUser, "orders", extra))
			if got.Code != want.Code || got.Message != want.Message {
				t.Errorf("through pgward: %s %q; directly: %s %q", got.Code, got.Message, want.Code, want.Message)
			}
		})
	}
}

// TestStartupParamsOwnedByPgward: role and session_authorization are
// refused as startup parameters as in options; pgward.principal is the
// claim either way; other pgward.* names are refused, not dropped.
func TestStartupParamsOwnedByPgward(t *testing.T) {
	h := newHarness(t, nil)
	for _, tc := range []struct{ extra, code, msg string }{
		{"role=" + testenv.MD5User, "42501", `startup parameter "role" is not allowed through pgward`},
		{"session_authorization=" + testenv.MD5User, "42501", `startup parameter "session_authorization" is not allowed through pgward`},
		{"options='-c role=" + testenv.MD5User + "'", "42501", `startup option "role" is not allowed through pgward`},
		{"pgward.foo=1", "42704", `startup parameter "pgward.foo" is not known to pgward`},
		{"options='-c pgward.foo=1'", "42704", `startup option "pgward.foo" is not known to pgward`},
		{"pgward.principal=stranger", "28000", `does not match claimed principal "stranger"`},
		{"pgward.principal=me options='-c pgward.principal=stranger'", "08P01", "two different principals claimed"},
	} {
		got := connectErr(t, h.dsn(testenv.ScramUser, "orders", tc.extra))
		if got.Code != tc.code || !strings.Contains(got.Message, tc.msg) {
			t.Errorf("%s: %s %q, want %s containing %q", tc.extra, got.Code, got.Message, tc.code, tc.msg)
		}
	}
	c := h.connect(t, testenv.ScramUser, "orders", "pgward.principal=me")
	if v := show(t, c, "session_authorization"); v != testenv.ScramUser {
		t.Errorf("session_authorization = %q", v)
	}
	var claim string
	for _, ev := range h.auditEvents(t) {
		if ev["event"] == "db.session.start" && ev["success"] == true {
			claim, _ = ev["principal"].(string)
		}
	}
	if claim != "me" {
		t.Errorf("principal of the session claimed as a startup parameter = %q, want me", claim)
	}
}

// TestTargetSessionAttrs: pgx's target_session_attrs check sees the
// session the client asked for, as directly.
func TestTargetSessionAttrs(t *testing.T) {
	h := newHarness(t, nil)
	ctx := context.Background()
	for _, tc := range []struct {
		extra string
		ok    bool
	}{
		{"default_transaction_read_only=on target_session_attrs=read-write", false},
		{"default_transaction_read_only=on target_session_attrs=read-only", true},
		{"target_session_attrs=read-write", true},
		{"target_session_attrs=read-only", false},
	} {
		for _, via := range []string{"direct", "pgward"} {
			dsn := h.dsn(testenv.ScramUser, "orders", tc.extra)
			if via == "direct" {
				dsn = h.pg.DSN(testenv.ScramUser, testenv.ScramPassword, testenv.Database) + " " + tc.extra
			}
			cctx, cancel := context.WithTimeout(ctx, 15*time.Second)
			c, err := pgx.Connect(cctx, dsn)
			cancel()
			if err == nil {
				c.Close(ctx)
			}
			if (err == nil) != tc.ok {
				t.Errorf("%s, %s: connect error %v, want success %v", tc.extra, via, err, tc.ok)
			}
		}
	}
}

// TestTargetSessionAttrsLibpq: libpq (psql) reads default_transaction_read_only
// from the ParameterStatus pgward greets it with, as from the server.
func TestTargetSessionAttrsLibpq(t *testing.T) {
	h := newHarness(t, nil)
	for _, tc := range []struct {
		attrs string
		ok    bool
	}{{"read-write", false}, {"read-only", true}} {
		for _, via := range []string{"direct", "pgward"} {
			dsn := h.dsn(testenv.ScramUser, "orders")
			if via == "direct" {
				dsn = h.pg.DSN(testenv.ScramUser, testenv.ScramPassword, testenv.Database)
			}
			dsn += " options='-c default_transaction_read_only=on' target_session_attrs=" + tc.attrs
			out, err := testenv.RunAs(uint32(os.Getuid()), uint32(os.Getgid()), "psql", "-XAt", "-c", "show transaction_read_only", dsn).CombinedOutput()
			if (err == nil) != tc.ok {
				t.Errorf("psql target_session_attrs=%s %s: %v %s, want success %v", tc.attrs, via, err, out, tc.ok)
			}
		}
	}
}

// TestReuseStartupParams: on a reused upstream connection the client's
// parameters are applied, a refused one gives the server's error, and the
// next session inherits none of them.
func TestReuseStartupParams(t *testing.T) {
	h := reuseHarness(t)
	ctx := context.Background()

	c1 := h.connect(t, testenv.ScramUser, "orders", "default_transaction_read_only=on", "work_mem=1234kB")
	pid := testenv.BackendPID(t, c1)
	if v := show(t, c1, "transaction_read_only"); v != "on" {
		t.Errorf("first session: transaction_read_only = %q, want on", v)
	}
	c1.Close(ctx)
	waitIdle(t, h, 1)

	c2 := h.connect(t, testenv.ScramUser, "orders", "statement_timeout=1s") // not 1ms: see TestStartupParamsForwarded
	if p := testenv.BackendPID(t, c2); p != pid {
		t.Fatalf("second session backend %d, want the parked %d", p, pid)
	}
	if v := show(t, c2, "transaction_read_only"); v != "off" {
		t.Errorf("second session inherited transaction_read_only = %q", v)
	}
	if v := show(t, c2, "work_mem"); v == "1234kB" {
		t.Errorf("second session inherited work_mem = %q", v)
	}
	_, err := c2.Exec(ctx, "select pg_sleep(10)")
	if code := testenv.PgCode(err); code != "57014" {
		t.Errorf("pg_sleep(10) with statement_timeout=1s on a reused connection: %v (SQLSTATE %q), want 57014", err, code)
	}
	c2.Close(ctx)
	waitIdle(t, h, 1)

	for _, extra := range []string{"nosuch_param=1", "statement_timeout=banana"} {
		want := directErr(t, h.pg, extra)
		got := connectErr(t, h.dsn(testenv.ScramUser, "orders", extra))
		if got.Code != want.Code || got.Message != want.Message {
			t.Errorf("%s on a reuse upstream: %s %q; directly: %s %q", extra, got.Code, got.Message, want.Code, want.Message)
		}
	}
}

// Issue 14, point 3: the request_id and principal in application_name.

// lastSessionStart returns the request_id of the last successful
// db.session.start.
func lastSessionStart(t *testing.T, h *harness) string {
	t.Helper()
	var rid string
	for _, ev := range h.auditEvents(t) {
		if ev["event"] == "db.session.start" && ev["success"] == true {
			rid, _ = ev["request_id"].(string)
		}
	}
	if rid == "" {
		t.Fatal("no successful db.session.start in the audit")
	}
	return rid
}

func statActivityApp(t *testing.T, c *pgx.Conn) string {
	t.Helper()
	var v string
	if err := c.QueryRow(context.Background(), "select application_name from pg_stat_activity where pid = pg_backend_pid()", pgx.QueryExecModeSimpleProtocol).Scan(&v); err != nil {
		t.Fatal(err)
	}
	return v
}

// TestApplicationNameCarriesRequestID: pg_stat_activity and the server
// log (%a) show the request_id of the session's db.session.start; the
// client's ParameterStatus still shows its own name.
func TestApplicationNameCarriesRequestID(t *testing.T) {
	pg := privatePG(t, testenv.Options{LogStatements: true, ExtraConf: []string{"log_line_prefix = '%m [%p] %a '"}})
	h := newHarness(t, onPrivatePG(pg))
	c := h.connect(t, testenv.ScramUser, "orders", "application_name=billing-worker")
	rid := lastSessionStart(t, h)
	want := "billing-worker pgward:me:" + rid
	if got := statActivityApp(t, c); got != want {
		t.Errorf("pg_stat_activity.application_name = %q, want %q", got, want)
	}
	if got := show(t, c, "application_name"); got != want {
		t.Errorf("SHOW application_name = %q, want %q", got, want)
	}
	if got := c.PgConn().ParameterStatus("application_name"); got != "billing-worker" {
		t.Errorf("ParameterStatus application_name = %q, want the client's own billing-worker", got)
	}
	marker := "issue14_marker_" + rid[:8]
	if _, err := c.Exec(context.Background(), "select '"+marker+"'", pgx.QueryExecModeSimpleProtocol); err != nil {
		t.Fatal(err)
	}
	line := regexp.MustCompile(`(?m)^.*` + regexp.QuoteMeta(want) + ` .*` + marker + `.*$`)
	deadline := time.Now().Add(5 * time.Second)
	for {
		b, err := os.ReadFile(pg.LogFile())
		if err != nil {
			t.Fatal(err)
		}
		if line.Match(b) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no server log line with %q and the statement; log tail:\n%s", want, tail(string(b), 2000))
		}
		time.Sleep(50 * time.Millisecond)
	}

	// psql (libpq sends application_name=psql).
	out, err := testenv.RunAs(uint32(os.Getuid()), uint32(os.Getgid()), "psql", "-XAt", "-c",
		"select application_name from pg_stat_activity where pid = pg_backend_pid()", h.dsn(testenv.ScramUser, "orders")).CombinedOutput()
	if err != nil {
		t.Fatalf("psql: %v %s", err, out)
	}
	if want := "psql pgward:me:" + lastSessionStart(t, h); strings.TrimSpace(string(out)) != want {
		t.Errorf("psql's pg_stat_activity.application_name = %q, want %q", out, want)
	}
}

// TestApplicationNameReuse: a reused connection carries each session's
// own request_id, and a session without an application_name gets pgward's
// part alone.
func TestApplicationNameReuse(t *testing.T) {
	h := reuseHarness(t)
	ctx := context.Background()
	c1 := h.connect(t, testenv.ScramUser, "orders", "application_name=first")
	rid1 := lastSessionStart(t, h)
	if got, want := statActivityApp(t, c1), "first pgward:me:"+rid1; got != want {
		t.Errorf("first session: %q, want %q", got, want)
	}
	pid := testenv.BackendPID(t, c1)
	c1.Close(ctx)
	waitIdle(t, h, 1)
	c2 := h.connect(t, testenv.ScramUser, "orders")
	if p := testenv.BackendPID(t, c2); p != pid {
		t.Fatalf("second session backend %d, want the parked %d", p, pid)
	}
	rid2 := lastSessionStart(t, h)
	if rid2 == rid1 {
		t.Fatal("two sessions with one request_id")
	}
	if got, want := statActivityApp(t, c2), "pgward:me:"+rid2; got != want {
		t.Errorf("reused session: %q, want %q", got, want)
	}
	if got := c2.PgConn().ParameterStatus("application_name"); got != "" {
		t.Errorf("reused session's ParameterStatus application_name = %q, want empty (it sent none)", got)
	}
}

// TestApplicationNameFormat: the per-upstream format, and "{app}" passes
// the client's own name through.
func TestApplicationNameFormat(t *testing.T) {
	h := newHarness(t, func(h *harness, c *Config) {
		u := c.Upstreams["orders"]
		u.ApplicationName = "{app}"
		c.Upstreams["orders"] = u
		u = c.Upstreams["orders_tls"]
		u.ApplicationName = "rid={request_id} p={principal}"
		c.Upstreams["orders_tls"] = u
	})
	c := h.connect(t, testenv.ScramUser, "orders", "application_name=mine")
	if got := statActivityApp(t, c); got != "mine" {
		t.Errorf("with {app}: %q, want mine", got)
	}
	c = h.connect(t, testenv.ScramUser, "orders_tls", "application_name=mine")
	if got, want := statActivityApp(t, c), "rid="+lastSessionStart(t, h)+" p=me"; got != want {
		t.Errorf("custom format: %q, want %q", got, want)
	}
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// TestMembershipCheckIgnoresClientSearchPath: now that every startup
// parameter reaches the session, pgward's own membership query runs under
// the client's search_path: an operator of the client's schema must not
// be able to hide a membership from refuse_role_switching.
func TestMembershipCheckIgnoresClientSearchPath(t *testing.T) {
	pg := privatePG(t, testenv.Options{})
	h := newHarness(t, func(h *harness, c *Config) {
		onPrivatePG(pg)(h, c)
		u := c.Upstreams["orders"]
		u.RefuseRoleSwitching = true
		c.Upstreams["orders"] = u
	})
	ctx := context.Background()
	admin, err := pg.Admin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(ctx)
	for _, q := range []string{
		"create role pgw_target nologin",
		"grant pgw_target to " + testenv.ScramUser,
		"create schema evil",
		"grant usage on schema evil to public",
		"create function evil.ne(oid, oid) returns bool language sql immutable as 'select false'",
		"create operator evil.<> (leftarg = oid, rightarg = oid, function = evil.ne)",
	} {
		if _, err := admin.Exec(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	e := connectErr(t, h.dsn(testenv.ScramUser, "orders", "search_path=evil,pg_catalog"))
	if e.Code != "42501" || !strings.Contains(e.Message, "pgw_target") {
		t.Fatalf("refused with %s %q, want 42501 naming the membership", e.Code, e.Message)
	}
}

// TestMembershipCheckIgnoresClientTimeouts: pgward's own membership query
// runs in the client's session, so before it was made immune it ran under
// the client's statement_timeout and lock_timeout (startup parameters):
// a client asking for 250ms could make the check fail, refusing its own
// login where refuse_role_switching is on (or, where off, losing the
// memberships from the audit). A lock on pg_auth_members, which the query
// reads and the login does not, holds it for a second. (Not 1ms: under
// 1ms a backend descheduled on a loaded machine cancels any statement,
// the test's own SHOW among them.)
func TestMembershipCheckIgnoresClientTimeouts(t *testing.T) {
	pg := privatePG(t, testenv.Options{})
	ctx := context.Background()
	for _, reuse := range []bool{false, true} {
		for _, param := range []string{"statement_timeout=250ms", "lock_timeout=250ms"} {
			t.Run(fmt.Sprintf("%s reuse=%v", param, reuse), func(t *testing.T) {
				h := newHarness(t, func(h *harness, c *Config) {
					onPrivatePG(pg)(h, c)
					u := c.Upstreams["orders"]
					u.RefuseRoleSwitching = true
					if reuse {
						u.Reuse = &broker.ReuseConfig{MaxIdle: 2, IdleTimeout: time.Minute}
					}
					c.Upstreams["orders"] = u
				})
				admin, err := pg.Admin(ctx)
				if err != nil {
					t.Fatal(err)
				}
				defer admin.Close(ctx)
				tx, err := admin.Begin(ctx)
				if err != nil {
					t.Fatal(err)
				}
				if _, err := tx.Exec(ctx, "lock table pg_catalog.pg_auth_members in access exclusive mode"); err != nil {
					t.Fatal(err)
				}
				released := make(chan error, 1)
				time.AfterFunc(time.Second, func() { released <- tx.Commit(ctx) })
				cfg, err := pgx.ParseConfig(h.dsn(testenv.ScramUser, "orders", param))
				if err != nil {
					t.Fatal(err)
				}
				cfg.OnNotice = func(_ *pgconn.PgConn, n *pgconn.Notice) {
					t.Errorf("notice after pgward's check: %s %s", n.Code, n.Message)
				}
				c, err := pgx.ConnectConfig(ctx, cfg)
				if rerr := <-released; rerr != nil {
					t.Fatal(rerr)
				}
				if err != nil {
					t.Fatalf("connect with %s while the membership query waits for a lock: %v", param, err)
				}
				defer c.Close(ctx)
				name, value, _ := strings.Cut(param, "=")
				if v := show(t, c, name); v != value {
					t.Errorf("%s = %q in the client's session, want %s", name, v, value)
				}
			})
		}
	}
}
