package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgward/pgward/agent"
	"github.com/pgward/pgward/testenv"
)

// adminAgent is an agent run in this process against the real Postgres,
// with its admin socket in a test directory.
type adminAgent struct {
	pg        *testenv.Postgres
	dir       string
	auditPath string
	admin     string
	agent     *agent.Agent
}

func startAdminAgent(t *testing.T) *adminAgent {
	t.Helper()
	pg := testenv.Require(t)
	dir, err := os.MkdirTemp("", "pgwo-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	secretsPath := filepath.Join(dir, "secrets.yaml")
	if err := os.WriteFile(secretsPath, []byte(fmt.Sprintf("real:\n  %[1]s: { password: %[2]q }\npooled:\n  %[1]s: { password: %[2]q }\n", testenv.ScramUser, testenv.ScramPassword)), 0o600); err != nil {
		t.Fatal(err)
	}
	h := &adminAgent{pg: pg, dir: dir, auditPath: filepath.Join(dir, "audit.jsonl"), admin: filepath.Join(dir, "admin", "admin.sock")}
	cfgText := fmt.Sprintf(`listen: { unix_dir: %[1]q, port: 5432 }
upstreams:
  real: { address: %[2]q, database: %[3]q }
  pooled: { address: %[2]q, database: %[3]q, reuse: {} }
secrets: { backend: file, file: { path: %[4]q } }
principals:
  ops: { match: { uid: [%[5]d] } }
grants:
  - { principal: ops, upstream: real, roles: [%[6]s] }
  - { principal: ops, upstream: pooled, roles: [%[6]s] }
audit: { path: %[7]q, durability: write, parameters: redacted }
ebpf: { enabled: "false" }
admin: { socket: %[8]q }
`, dir, pg.SocketPath(), testenv.Database, secretsPath, os.Getuid(), testenv.ScramUser, h.auditPath, h.admin)
	cfgPath := filepath.Join(dir, "pgward.yaml")
	if err := os.WriteFile(cfgPath, []byte(cfgText), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := agent.LoadConfig(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	a, err := agent.New(context.Background(), agent.Options{Config: cfg, ConfigPath: cfgPath})
	if err != nil {
		t.Fatal(err)
	}
	h.agent = a
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("agent: %v", err)
		}
	})
	return h
}

func (h *adminAgent) dsn() string { return h.dsnTo("real") }

func (h *adminAgent) dsnTo(upstream string) string {
	return fmt.Sprintf("host=%s port=5432 user=%s dbname=%s sslmode=disable connect_timeout=10", h.dir, testenv.ScramUser, upstream)
}

// list runs `pgward sessions --json`.
func (h *adminAgent) list(t *testing.T, args ...string) agent.AdminSessions {
	t.Helper()
	code, out, errs := runCLI(append([]string{"sessions", "--socket", h.admin, "--json"}, args...)...)
	if code != exitOK {
		t.Fatalf("sessions --json: %d %s", code, errs)
	}
	var l agent.AdminSessions
	if err := json.Unmarshal([]byte(out), &l); err != nil {
		t.Fatalf("sessions --json: %v\n%s", err, out)
	}
	return l
}

// auditLines returns the audit file's events.
func (h *adminAgent) auditLines(t *testing.T) []map[string]any {
	t.Helper()
	data, err := os.ReadFile(h.auditPath)
	if err != nil {
		t.Fatal(err)
	}
	var out []map[string]any
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(nil, 16<<20)
	for sc.Scan() {
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			t.Fatalf("audit line: %v", err)
		}
		out = append(out, m)
	}
	return out
}

// TestSessionsListAndEnd: a psql session running pg_sleep is listed with
// its pid, exe and running statement; `sessions end` ends it: the
// statement is cancelled upstream (pg_stat_activity no longer has it long
// before the sleep would end), psql gets 57P01 saying an operator ended
// the session, and the audit has admin.sessions.end with the operator's
// process and reason, and the session's end with ended_by_operator.
func TestSessionsListAndEnd(t *testing.T) {
	testenv.RequireRoot(t) // the admin API serves root only
	h := startAdminAgent(t)
	psqlPath, err := exec.LookPath("psql")
	if err != nil {
		psqlPath = filepath.Join(mustBinDir(t), "psql")
	}
	// psql reads its statements from a pipe: the sleep, then (after the
	// end) one more, on which libpq reports the FATAL the session ended with.
	var psqlOut lockedBuffer
	psql := exec.Command(psqlPath, "-X", "-f", "-", h.dsn())
	psql.Stdout, psql.Stderr = &psqlOut, &psqlOut
	stdin, err := psql.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := psql.Start(); err != nil {
		t.Fatal(err)
	}
	fmt.Fprintln(stdin, `\set VERBOSITY verbose`)
	fmt.Fprintln(stdin, "select pg_sleep(120) /* ops-sleep */;")
	psqlDone := make(chan error, 1)
	go func() { psqlDone <- psql.Wait() }()
	t.Cleanup(func() { _ = psql.Process.Kill() })

	// Listed, with its pid and exe, active in pg_sleep.
	var sess agent.AdminSession
	deadline := time.Now().Add(15 * time.Second)
	for {
		code, out, errs := runCLI("sessions", "--socket", h.admin, "--json")
		if code != exitOK {
			t.Fatalf("sessions --json: %d %s", code, errs)
		}
		var l agent.AdminSessions
		if err := json.Unmarshal([]byte(out), &l); err != nil {
			t.Fatalf("sessions --json: %v\n%s", err, out)
		}
		if len(l.Sessions) == 1 && l.Sessions[0].State == "active" {
			sess = l.Sessions[0]
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("psql's session not listed active: %s\npsql: %s", out, psqlOut.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	if sess.Process.PID != int32(psql.Process.Pid) || sess.Process.Exe != psqlPath && filepath.Base(sess.Process.Exe) != "psql" {
		t.Errorf("listed process %+v, want pid %d exe %s", sess.Process, psql.Process.Pid, psqlPath)
	}
	if sess.Principal != "ops" || sess.Role != testenv.ScramUser || sess.Upstream != "real" || sess.BackendPID == 0 {
		t.Errorf("listed session %+v", sess)
	}
	if !strings.HasPrefix(sess.Statement, "select pg_sleep(120)") || sess.Statements != 1 || sess.BytesIn == 0 || sess.StatementMS <= 0 {
		t.Errorf("listed statement %q (%v ms), statements %d, bytes in %d", sess.Statement, sess.StatementMS, sess.Statements, sess.BytesIn)
	}
	code, table, errs := runCLI("sessions", "--socket", h.admin)
	t.Logf("pgward sessions:\n%s", table)
	if code != exitOK || !strings.Contains(table, sess.SID) || !strings.Contains(table, "["+strconv.Itoa(psql.Process.Pid)+"]") ||
		!strings.Contains(table, sess.Process.Exe) || !strings.Contains(table, "active") || !strings.Contains(table, "select pg_sleep(120)") {
		t.Errorf("sessions table (%d):\n%s%s", code, table, errs)
	}
	// Filters.
	if _, out, _ := runCLI("sessions", "--socket", h.admin, "--json", "--principal", "nobody"); strings.Contains(out, sess.SID) {
		t.Error("--principal nobody listed the session")
	}
	if _, out, _ := runCLI("sessions", "--socket", h.admin, "--json", "--uid", strconv.Itoa(os.Getuid())); !strings.Contains(out, sess.SID) {
		t.Error("--uid of the caller did not list the session")
	}

	// Unknown sid: says so, exit 1, nothing ended.
	code, _, errs = runCLI("sessions", "end", "--socket", h.admin, "00000000-0000-4000-8000-000000000000")
	if code != exitFailure || !strings.Contains(errs, "no live session has id") {
		t.Fatalf("end of an unknown sid: %d %s", code, errs)
	}

	ended := time.Now()
	code, out, errs := runCLI("sessions", "end", "--socket", h.admin, "--reason", "ops drill", sess.SID)
	if code != exitOK || !strings.Contains(out, "ended "+sess.SID) {
		t.Fatalf("sessions end: %d %s%s", code, out, errs)
	}
	// The statement's cancel reaches psql first; its next statement
	// finds the session ended.
	waitFor(t, 15*time.Second, func() bool { return strings.Contains(psqlOut.String(), "canceling statement") }, func() string { return psqlOut.String() })
	fmt.Fprintln(stdin, "select 1;")
	stdin.Close()
	select {
	case <-psqlDone:
	case <-time.After(20 * time.Second):
		t.Fatalf("psql still running 20 s after its session was ended: %s", psqlOut.String())
	}
	if took := time.Since(ended); took > 15*time.Second {
		t.Errorf("the end took %s", took)
	}
	if got := psqlOut.String(); !strings.Contains(got, "FATAL:  57P01: pgward: an operator ended this session (ops drill)") ||
		!strings.Contains(got, "cancelled the statement that was running") || !strings.Contains(got, "57014") {
		t.Errorf("psql was told: %s", got)
	}
	t.Logf("psql:\n%s", psqlOut.String())
	// The statement is gone from the server (cancelled, not left to sleep).
	ctx := context.Background()
	admin, err := h.pg.Admin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(ctx)
	var n int
	if err := admin.QueryRow(ctx, "select count(*) from pg_stat_activity where query like '%ops-sleep%' and pid <> pg_backend_pid()").Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != 0 {
		t.Errorf("pg_sleep still in pg_stat_activity after the end (%d)", n)
	}

	// The audit: the operator's action, the statement's real outcome, the end.
	var adminEnd, result, end map[string]any
	for _, ev := range h.auditLines(t) {
		switch {
		case ev["event"] == "admin.sessions.end" && ev["sid"] == sess.SID:
			adminEnd = ev
		case ev["event"] == "db.session.query.result" && ev["sid"] == sess.SID:
			result = ev
		case ev["event"] == "db.session.end" && ev["sid"] == sess.SID:
			end = ev
		}
	}
	if adminEnd == nil || adminEnd["reason"] != "ops drill" || adminEnd["success"] != true || adminEnd["code"] != "PGW10I" ||
		adminEnd["process"].(map[string]any)["pid"] != float64(os.Getpid()) || adminEnd["process"].(map[string]any)["uid"] != float64(0) ||
		adminEnd["target_pid"] != float64(psql.Process.Pid) || adminEnd["principal"] != "ops" {
		t.Errorf("admin.sessions.end event: %v", adminEnd)
	}
	if result == nil || result["sqlstate"] != "57014" || !strings.Contains(fmt.Sprint(result["error"]), "pgward cancelled this statement") {
		t.Errorf("statement result: %v", result)
	}
	if end == nil || end["reason"] != "ended_by_operator" {
		t.Errorf("session end: %v", end)
	}
	// audit show tells the story of the session, the operator's end included.
	code, shown, errs := runCLI("audit", "show", "--sid", sess.SID, h.auditPath)
	t.Logf("pgward audit show --sid %s:\n%s%s", sess.SID, shown, errs)
	for _, want := range []string{"session start", "query #1: select pg_sleep(120) /* ops-sleep */;",
		"admin: ended session " + sess.SID + " (reason: ops drill)", "result #1: failed 57014: pgward cancelled this statement while ending the session (ended_by_operator)",
		"session end (ended_by_operator, 1 statements)"} {
		if code != exitOK || !strings.Contains(shown, want) {
			t.Errorf("audit show --sid: no %q in\n%s", want, shown)
		}
	}
	// The list and the refused unknown sid were audited too.
	var lists, unknown int
	for _, ev := range h.auditLines(t) {
		if ev["event"] == "admin.sessions.list" && ev["success"] == true {
			lists++
		}
		if ev["event"] == "admin.sessions.end" && ev["sid"] == "00000000-0000-4000-8000-000000000000" && ev["success"] == false && ev["code"] == "PGW10W" {
			unknown++
		}
	}
	if lists < 4 || unknown != 1 {
		t.Errorf("audited lists %d (want ≥ 4), unknown-sid ends %d (want 1)", lists, unknown)
	}
}

// The states pg_stat_activity would show (from the server's
// ReadyForQuery), the statement count and traffic, and the connections a
// reuse upstream parks.
func TestSessionsStates(t *testing.T) {
	testenv.RequireRoot(t)
	h := startAdminAgent(t)
	ctx := context.Background()
	c, err := pgx.Connect(ctx, h.dsn())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(ctx)
	state := func() agent.AdminSession {
		t.Helper()
		l := h.list(t)
		if len(l.Sessions) != 1 {
			t.Fatalf("%d sessions listed, want 1", len(l.Sessions))
		}
		return l.Sessions[0]
	}
	if s := state(); s.State != "idle" || s.Statements != 0 || s.Statement != "" {
		t.Errorf("fresh session: %+v", s)
	}
	for _, step := range []struct{ sql, want string }{
		{"begin", "idle in transaction"},
		{"select 1/0", "idle in transaction (aborted)"},
		{"rollback", "idle"},
	} {
		_, _ = c.Exec(ctx, step.sql)
		if s := state(); s.State != step.want || !strings.HasPrefix(s.Statement, step.sql) {
			t.Errorf("after %q: state %q, statement %q; want %q", step.sql, s.State, s.Statement, step.want)
		}
	}
	s := state()
	if s.Statements != 3 || s.BytesIn == 0 || s.BytesOut == 0 || s.Process.PID != int32(os.Getpid()) {
		t.Errorf("counters: %+v", s)
	}
	// Reuse: a session that ends idle parks its connection; the list shows it.
	p, err := pgx.Connect(ctx, h.dsnTo("pooled"))
	if err != nil {
		t.Fatal(err)
	}
	var backend uint32
	if err := p.QueryRow(ctx, "select pg_backend_pid()").Scan(&backend); err != nil {
		t.Fatal(err)
	}
	p.Close(ctx)
	// The session parks its connection before it leaves the session list
	// (its end is still being reported): wait for both.
	var l agent.AdminSessions
	waitFor(t, 10*time.Second, func() bool {
		l = h.list(t, "--upstream", "pooled")
		return len(l.Parked) == 1 && len(l.Sessions) == 0
	}, func() string { return fmt.Sprint(l) })
	if pk := l.Parked[0]; pk.Upstream != "pooled" || pk.Role != testenv.ScramUser || pk.BackendPID != backend {
		t.Errorf("parked: %+v (backend %d)", l, backend)
	}
	_, table, _ := runCLI("sessions", "--socket", h.admin)
	if !strings.Contains(table, "parked upstream connections (reuse): 1") || !strings.Contains(table, strconv.Itoa(int(backend))) {
		t.Errorf("table:\n%s", table)
	}
}

// A caller that is not root: the socket's mode keeps it out, and with the
// mode opened up the agent refuses it by its peer credentials (audited).
// Either way the CLI says it needs root and exits 1; so does audit show
// on root's audit file.
func TestSessionsNeedRoot(t *testing.T) {
	testenv.RequireRoot(t)
	h := startAdminAgent(t)
	if fi, err := os.Stat(h.admin); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("admin socket mode: %v %v", fi, err)
	}
	uid := testenv.UnprivilegedIDs(t, 1)[0]
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	// The test binary must be runnable by the unprivileged uid.
	bin := filepath.Join(h.dir, "pgward.test")
	data, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, data, 0o755); err != nil {
		t.Fatal(err)
	}
	runArgs := func(args string) (int, string) {
		cmd := testenv.RunAs(uid, uid, bin, "-test.run=^$")
		cmd.Env = append(cmd.Env, "PGWARD_CMD_CHILD="+args)
		out, err := cmd.CombinedOutput()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		return code, string(out)
	}
	run := func() (int, string) { return runArgs("sessions --socket " + h.admin) }
	// audit show: the audit file is root's (0600).
	if code, out := runArgs("audit show " + h.auditPath); code != exitFailure || !strings.Contains(out, "needs root") {
		t.Errorf("non-root audit show: %d %s", code, out)
	}
	if err := os.Chmod(filepath.Dir(h.admin), 0o755); err != nil {
		t.Fatal(err)
	}
	if code, out := run(); code != exitFailure || !strings.Contains(out, "needs root") {
		t.Errorf("non-root on the 0600 socket: %d %s", code, out)
	}
	if err := os.Chmod(h.admin, 0o666); err != nil {
		t.Fatal(err)
	}
	if code, out := run(); code != exitFailure || !strings.Contains(out, "needs root") || !strings.Contains(out, "uid "+strconv.Itoa(int(uid))) {
		t.Errorf("non-root on an open socket: %d %s", code, out)
	}
	refused := 0
	for _, ev := range h.auditLines(t) {
		if ev["event"] == "admin.sessions.list" && ev["success"] == false && ev["code"] == "PGW09W" &&
			ev["process"].(map[string]any)["uid"] == float64(uid) {
			refused++
		}
	}
	if refused != 1 {
		t.Errorf("refused admin requests audited: %d, want 1", refused)
	}
	// Usage errors.
	if code, _, _ := runCLI("sessions", "--nope"); code != exitUsage {
		t.Errorf("unknown flag: exit %d", code)
	}
	if code, _, _ := runCLI("sessions", "end", "--socket", h.admin); code != exitUsage {
		t.Errorf("end without a sid: exit %d", code)
	}
	if code, _, _ := runCLI("sessions", "--uid", "x", "--socket", h.admin); code != exitUsage {
		t.Errorf("--uid x: exit %d", code)
	}
}

// waitFor polls cond until it holds or d passes (then fails with what()).
func waitFor(t *testing.T, d time.Duration, cond func() bool, what func() string) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within %s: %s", d, what())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func mustBinDir(t *testing.T) string {
	t.Helper()
	d, err := testenv.FindBinDir()
	if err != nil {
		t.Fatal(err)
	}
	return d
}
