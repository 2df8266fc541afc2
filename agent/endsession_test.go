package agent

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgward/pgward/broker"
	"github.com/pgward/pgward/broker/secrets/vault"
	"github.com/pgward/pgward/testenv"
	"github.com/pgward/pgward/testenv/vaultsim"
)

// Ending a session from outside (issue 12 point 4): pgward cancels the
// running statement upstream, waits for its outcome, and audits what
// really happened.

// endFixture creates table name (any role may insert) and the functions
// the tests run: stubborn_done(s) sleeps until cancelled, then finishes
// after s more seconds whatever cancels come; stubborn_hang() sleeps 30 s
// through any cancel.
func endFixture(t *testing.T, h *harness, table string) *pgx.Conn {
	t.Helper()
	ctx := context.Background()
	admin, err := h.pg.Admin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { admin.Close(context.Background()) })
	for _, q := range []string{
		"drop table if exists " + table,
		"create table " + table + " (n int)",
		"grant select, insert on " + table + " to public",
		"drop function if exists stubborn_sleep(float8)",
		// Each catches every cancel (a loop of blocks), so only
		// pg_terminate_backend (FATAL, not catchable) stops it early.
		// One CancelRequest can interrupt a backend twice: the postmaster
		// sends SIGINT to the backend and then to its process group, and
		// under load the second can come after the first was handled,
		// between two statements of a handler or of the loop, outside any
		// block. The functions' outer handlers catch that second one.
		`create or replace function stubborn_sleep(s float8, t0 timestamptz default clock_timestamp()) returns void language plpgsql as $$
begin
  loop
    begin
      perform pg_sleep(greatest(0, s - extract(epoch from clock_timestamp() - t0)));
      return;
    exception when query_canceled then null;
    end;
  end loop;
exception when query_canceled then
  perform stubborn_sleep(s, t0);
end $$`,
		`create or replace function stubborn_done(s float8) returns int language plpgsql as $$
begin
  begin
    perform pg_sleep(30);
  exception when query_canceled then
    perform stubborn_sleep(s);
    return 1;
  end;
  return 0;
exception when query_canceled then
  perform stubborn_sleep(s);
  return 1;
end $$`,
		`create or replace function stubborn_hang() returns int language plpgsql as $$
begin
  perform stubborn_sleep(30);
  return 1;
end $$`,
	} {
		if _, err := admin.Exec(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	return admin
}

// startRunning runs sql on c in the background and returns when the server
// shows it in pg_sleep (inside the functions' exception blocks); the
// channel gets Exec's error.
func startRunning(t *testing.T, admin, c *pgx.Conn, sql string) chan error {
	t.Helper()
	res := make(chan error, 1)
	go func() {
		_, err := c.Exec(context.Background(), sql)
		res <- err
	}()
	pid := c.PgConn().PID()
	deadline := time.Now().Add(15 * time.Second)
	for {
		var n int
		if err := admin.QueryRow(context.Background(),
			"select count(*) from pg_stat_activity where pid = $1 and state = 'active' and query = $2 and wait_event = 'PgSleep'", pid, sql).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n == 1 {
			// Well inside the function's exception block.
			time.Sleep(200 * time.Millisecond)
			return res
		}
		if time.Now().After(deadline) {
			t.Fatalf("statement %q never showed as running", sql)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// backendGone waits until backend pid has left pg_stat_activity, so that
// whatever it was running has committed or rolled back.
func backendGone(t *testing.T, admin *pgx.Conn, pid uint32, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		var n int
		if err := admin.QueryRow(context.Background(), "select count(*) from pg_stat_activity where pid = $1", pid).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("backend %d still there after %v", pid, within)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func rowCount(t *testing.T, admin *pgx.Conn, table string) int {
	t.Helper()
	var n int
	if err := admin.QueryRow(context.Background(), "select count(*) from "+table).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// auditResult returns the db.session.query event whose text contains
// text, and its db.session.query.result, and the session's end event.
func auditResult(t *testing.T, h *harness, text string) (query, result, end map[string]any) {
	t.Helper()
	evs := h.auditEvents(t)
	for _, ev := range evs {
		if ev["event"] == "db.session.query" && strings.Contains(ev["db_query"].(string), text) {
			query = ev
		}
	}
	if query == nil {
		t.Fatalf("no audit event for %q", text)
	}
	for _, ev := range evs {
		if ev["sid"] != query["sid"] {
			continue
		}
		switch ev["event"] {
		case "db.session.query.result":
			if ev["query_index"] == query["query_index"] {
				result = ev
			}
		case "db.session.end":
			end = ev
		}
	}
	return query, result, end
}

// finalError reads what the client is told after its statement: the FATAL
// ErrorResponse pgward sends before closing.
func finalError(t *testing.T, c *pgx.Conn) *pgconn.PgError {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	err := c.PgConn().WaitForNotification(ctx)
	var pe *pgconn.PgError
	if !errors.As(err, &pe) {
		t.Fatalf("after the end the client got %v, want pgward's ErrorResponse", err)
	}
	return pe
}

func TestRevokeCancelsRunningStatement(t *testing.T) {
	h := newHarness(t, nil)
	admin := endFixture(t, h, "end_revoke")
	c := h.connect(t, testenv.ScramUser, "orders")
	pid := c.PgConn().PID()
	const sql = "insert into end_revoke select 1 from pg_sleep(5)"
	res := startRunning(t, admin, c, sql)

	writeReloadConfig(t, h, []string{testenv.MD5User}, "", "")
	start := time.Now()
	if err := h.agent.Reload(); err != nil {
		t.Fatal(err)
	}
	err := <-res
	el := time.Since(start)
	backendGone(t, admin, pid, 15*time.Second)
	if n := rowCount(t, admin, "end_revoke"); n != 0 {
		t.Fatalf("%d rows committed by a statement of a revoked session", n)
	}
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "57014" {
		t.Fatalf("statement ended with %v, want the server's 57014", err)
	}
	if el > 4*time.Second {
		t.Fatalf("the statement ran %v after the revocation", el)
	}
	if fe := finalError(t, c); fe.Code != broker.CodeInvalidAuthorization || !strings.Contains(fe.Message, "cancelled") {
		t.Fatalf("client told %s %q, want %s saying the statement was cancelled", fe.Code, fe.Message, broker.CodeInvalidAuthorization)
	}
	var q, r, end map[string]any
	eventually(t, "the session's end in the audit", func() bool { q, r, end = auditResult(t, h, sql); return end != nil })
	if r == nil || r["success"] != false || r["sqlstate"] != "57014" ||
		!strings.Contains(r["error"].(string), "pgward cancelled") || !strings.Contains(r["error"].(string), "grant_revoked") {
		t.Fatalf("audit result %v, want 57014 cancelled by pgward (grant_revoked)", r)
	}
	if end["reason"] != "grant_revoked" || end["ei"].(float64) < r["ei"].(float64) {
		t.Fatalf("session end %v after result %v", end, r)
	}
	_ = q
}

func TestShutdownGraceCancelsRunningStatement(t *testing.T) {
	h := newHarness(t, func(h *harness, c *Config) { c.Shutdown.Grace = time.Second })
	admin := endFixture(t, h, "end_drain")
	c := h.connect(t, testenv.ScramUser, "orders")
	pid := c.PgConn().PID()
	const sql = "insert into end_drain select 1 from pg_sleep(6)"
	res := startRunning(t, admin, c, sql)

	h.cancel() // the first SIGTERM
	h.cancel = nil
	select {
	case err := <-h.done:
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Run did not return")
	}
	err := <-res
	backendGone(t, admin, pid, 15*time.Second)
	if n := rowCount(t, admin, "end_drain"); n != 0 {
		t.Fatalf("%d rows committed by a statement pgward ended at shutdown", n)
	}
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "57014" {
		t.Fatalf("statement ended with %v, want the server's 57014", err)
	}
	if fe := finalError(t, c); fe.Code != broker.CodeAdminShutdown {
		t.Fatalf("client told %s %q, want %s", fe.Code, fe.Message, broker.CodeAdminShutdown)
	}
	_, r, end := auditResult(t, h, sql)
	if r == nil || r["sqlstate"] != "57014" || !strings.Contains(r["error"].(string), "pgward cancelled") || !strings.Contains(r["error"].(string), "shutdown") {
		t.Fatalf("audit result %v, want 57014 cancelled by pgward (shutdown)", r)
	}
	if end == nil || end["reason"] != "shutdown" {
		t.Fatalf("session end %v", end)
	}
}

// A statement that completes within limits.cancel_wait (here: one that
// catches the cancel and finishes its work) is audited as the success it
// was, and the session ends after it.
func TestEndAuditsStatementThatCompletes(t *testing.T) {
	h := newHarness(t, nil)
	admin := endFixture(t, h, "end_done")
	c := h.connect(t, testenv.ScramUser, "orders")
	const sql = "insert into end_done select stubborn_done(1)"
	res := startRunning(t, admin, c, sql)

	writeReloadConfig(t, h, []string{testenv.MD5User}, "", "")
	if err := h.agent.Reload(); err != nil {
		t.Fatal(err)
	}
	err := <-res
	var r, end map[string]any
	eventually(t, "the session's end in the audit", func() bool { _, r, end = auditResult(t, h, sql); return end != nil })
	if r == nil || r["success"] != true || r["command_tag"] != "INSERT 0 1" {
		t.Fatalf("audit result %v, want success INSERT 0 1", r)
	}
	if n := rowCount(t, admin, "end_done"); n != 1 {
		t.Fatalf("%d rows, want the 1 the statement inserted", n)
	}
	if err != nil {
		t.Fatalf("the statement that completed: %v", err)
	}
	if fe := finalError(t, c); fe.Code != broker.CodeInvalidAuthorization || !strings.Contains(fe.Message, "completed") {
		t.Fatalf("client told %s %q", fe.Code, fe.Message)
	}
	if end["reason"] != "grant_revoked" || end["ei"].(float64) < r["ei"].(float64) {
		t.Fatalf("session end %v after result %v", end, r)
	}
}

// A statement that ignores the cancel is ended with pg_terminate_backend
// once limits.cancel_wait has passed.
func TestEndTerminatesStatementThatIgnoresCancel(t *testing.T) {
	h := newHarness(t, func(h *harness, c *Config) { c.Limits.CancelWait = time.Second })
	admin := endFixture(t, h, "end_hang")
	c := h.connect(t, testenv.ScramUser, "orders")
	pid := c.PgConn().PID()
	const sql = "insert into end_hang select stubborn_hang()"
	res := startRunning(t, admin, c, sql)

	writeReloadConfig(t, h, []string{testenv.MD5User}, "", "limits: { cancel_wait: 1s }\n")
	start := time.Now()
	if err := h.agent.Reload(); err != nil {
		t.Fatal(err)
	}
	<-res
	backendGone(t, admin, pid, 15*time.Second)
	if el := time.Since(start); el > 6*time.Second {
		t.Fatalf("backend lived %v after the revocation", el)
	}
	if n := rowCount(t, admin, "end_hang"); n != 0 {
		t.Fatalf("%d rows committed by a statement of a revoked session", n)
	}
	var r, end map[string]any
	eventually(t, "the session's end in the audit", func() bool { _, r, end = auditResult(t, h, sql); return end != nil })
	if r == nil || r["success"] != false || r["sqlstate"] != broker.CodeAdminShutdown || !strings.Contains(r["error"].(string), "pgward terminated") {
		t.Fatalf("audit result %v, want 57P01 terminated by pgward", r)
	}
	if end["reason"] != "grant_revoked" {
		t.Fatalf("session end %v", end)
	}
}

// A revoked Vault lease ends its session the same way: the running
// statement is cancelled upstream, not left to commit.
func TestLeaseEndCancelsRunningStatement(t *testing.T) {
	pg := testenv.SharedPostgres(t)
	sim := vaultsim.New(vaultsim.Options{Exec: pg.Exec, Logf: t.Logf})
	t.Cleanup(sim.Close)
	sim.AddDatabaseRole("database", "app", vaultsim.DatabaseRole{
		CreationStatements: []string{
			`CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}'`,
			`GRANT CONNECT ON DATABASE ` + testenv.Database + ` TO "{{name}}"`,
		},
		// Leave the role's sessions alone on revocation: pgward must end them.
		RevocationStatements: []string{`SELECT 1`},
		DefaultTTL:           time.Hour,
	})
	h := newHarness(t, func(h0 *harness, c *Config) {
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
				"vdyn": {"app": {Database: &vault.DatabaseConfig{Mount: "database", Role: "app"}}},
			},
		}
		c.Upstreams["vdyn"] = broker.UpstreamConfig{Address: pg.SocketPath(), Database: testenv.Database, Secrets: "vault"}
		c.Grants = append(c.Grants, broker.Grant{Principal: "me", Upstream: "vdyn", Roles: []string{"app"}})
	})
	admin := endFixture(t, h, "end_lease")
	c := h.connect(t, "app", "vdyn")
	pid := c.PgConn().PID()
	const sql = "insert into end_lease select 1 from pg_sleep(8)"
	res := startRunning(t, admin, c, sql)
	leases := sim.Leases()
	if len(leases) != 1 {
		t.Fatalf("leases %+v", leases)
	}
	if err := sim.RevokeLease(leases[0].ID); err != nil {
		t.Fatal(err)
	}
	err := <-res
	backendGone(t, admin, pid, 20*time.Second)
	if n := rowCount(t, admin, "end_lease"); n != 0 {
		t.Fatalf("%d rows committed by a statement whose lease was revoked", n)
	}
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "57014" {
		t.Fatalf("statement ended with %v, want the server's 57014", err)
	}
	var r, end map[string]any
	eventually(t, "the session's end in the audit", func() bool { _, r, end = auditResult(t, h, sql); return end != nil })
	if r == nil || r["sqlstate"] != "57014" || !strings.Contains(r["error"].(string), "pgward cancelled") || !strings.Contains(r["error"].(string), "revoked") {
		t.Fatalf("audit result %v, want 57014 cancelled by pgward (lease revoked)", r)
	}
}
