package agent

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgward/pgward/broker"
	"github.com/pgward/pgward/testenv"
)

// readyStatus is the HTTP status of /readyz.
func readyStatus(h *harness) int {
	resp, err := http.Get("http://" + h.agent.MetricsAddr().String() + "/readyz")
	if err != nil {
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}

// sessionEnd finds the db.session.end event of db_user, or nil.
func sessionEnd(t *testing.T, h *harness, user string) map[string]any {
	t.Helper()
	for _, ev := range h.auditEvents(t) {
		if ev["event"] == "db.session.end" && ev["db_user"] == user {
			return ev
		}
	}
	return nil
}

// SIGTERM's path in process: stop accepting, /readyz 503, an open
// transaction finishes and commits, idle sessions are ended with an audit
// record once the grace period is over, and Run returns.
func TestDrainLetsSessionsFinish(t *testing.T) {
	const grace = 3 * time.Second
	h := newHarness(t, func(h *harness, c *Config) { c.Shutdown.Grace = grace })
	ctx := context.Background()
	if s := readyStatus(h); s != 200 {
		t.Fatalf("/readyz %d before the drain", s)
	}
	busy := h.connect(t, testenv.ScramUser, "orders")
	if _, err := busy.Exec(ctx, "drop table if exists drain_test; create table drain_test (n int)"); err != nil {
		t.Fatal(err)
	}
	idle := h.connect(t, testenv.MD5User, "orders")
	if _, err := idle.Exec(ctx, "select 1"); err != nil {
		t.Fatal(err)
	}
	tx, err := busy.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, "insert into drain_test values (1)"); err != nil {
		t.Fatal(err)
	}

	start := time.Now()
	h.cancel() // what the first SIGTERM does
	h.cancel = nil

	eventually(t, "/readyz 503 while draining", func() bool { return readyStatus(h) == http.StatusServiceUnavailable })
	cctx, ccancel := context.WithTimeout(ctx, 5*time.Second)
	if c, err := pgx.Connect(cctx, h.dsn(testenv.ScramUser, "orders")); err == nil {
		c.Close(ctx)
		t.Error("a new connection was accepted while draining")
	}
	ccancel()

	// The transaction in flight completes.
	if _, err := tx.Exec(ctx, "insert into drain_test values (2)"); err != nil {
		t.Fatalf("in-flight transaction during the drain: %v", err)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatalf("commit during the drain: %v", err)
	}
	busy.Close(ctx)

	var runErr error
	select {
	case runErr = <-h.done:
	case <-time.After(grace + 10*time.Second):
		t.Fatal("Run did not return after the grace period")
	}
	el := time.Since(start)
	if runErr != nil {
		t.Fatalf("Run: %v", runErr)
	}
	if el < grace-100*time.Millisecond || el > grace+5*time.Second {
		t.Fatalf("Run returned after %v, want about the %v grace (an idle session was open)", el, grace)
	}
	if _, err := idle.Exec(ctx, "select 1"); err == nil {
		t.Fatal("the idle session still works after the grace period")
	} else if pe := (*pgconn.PgError)(nil); errors.As(err, &pe) && pe.Code != broker.CodeAdminShutdown {
		t.Fatalf("idle session ended with %s %s, want %s", pe.Code, pe.Message, broker.CodeAdminShutdown)
	}

	admin, err := h.pg.Admin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(ctx)
	var n int
	if err := admin.QueryRow(ctx, "select count(*) from drain_test").Scan(&n); err != nil || n != 2 {
		t.Fatalf("committed rows %d %v, want 2", n, err)
	}

	// Audit was flushed before Run returned: both ends are there.
	if ev := sessionEnd(t, h, testenv.MD5User); ev == nil || ev["reason"] != "shutdown" {
		t.Fatalf("idle session end %v, want reason shutdown", ev)
	}
	if ev := sessionEnd(t, h, testenv.ScramUser); ev == nil || ev["reason"] == "shutdown" {
		t.Fatalf("finished session end %v, want the client's own close", ev)
	}
}

// With no sessions open the drain ends at once.
func TestDrainWithoutSessionsIsQuick(t *testing.T) {
	h := newHarness(t, func(h *harness, c *Config) { c.Shutdown.Grace = 20 * time.Second })
	c := h.connect(t, testenv.ScramUser, "orders")
	c.Close(context.Background())
	start := time.Now()
	h.cancel()
	h.cancel = nil
	if err := <-h.done; err != nil {
		t.Fatal(err)
	}
	if el := time.Since(start); el > 3*time.Second {
		t.Fatalf("drain took %v with no sessions", el)
	}
}

// reloadConfig writes the harness's configuration as a file, with the given
// roles granted to "me" on orders and extra YAML appended, and points the
// agent at it.
func writeReloadConfig(t *testing.T, h *harness, roles []string, extraGrants, extra string) string {
	t.Helper()
	path := filepath.Join(h.dir, "pgward.yaml")
	text := fmt.Sprintf(`listen: { unix_dir: %q, port: 5432 }
upstreams:
  orders: { address: %q, database: %q, auth: [scram-sha-256, md5, password] }
secrets: { backend: file, file: { path: %q } }
principals:
  me: { match: { uid: [%d] } }
grants:
  - { principal: me, upstream: orders, roles: [%s] }
%saudit: { path: %q, durability: write, parameters: full }
ebpf: { enabled: "false" }
%s`, h.dir, h.pg.SocketPath(), testenv.Database, filepath.Join(h.dir, "secrets.yaml"), os.Getuid(),
		strings.Join(roles, ", "), extraGrants, h.auditPath, extra)
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	h.agent.cfgPath = path
	return path
}

func TestReload(t *testing.T) {
	h := newHarness(t, func(h *harness, c *Config) {
		c.Grants = []broker.Grant{{Principal: "me", Upstream: "orders", Roles: []string{testenv.ScramUser, testenv.MD5User}}}
	})
	ctx := context.Background()
	s1 := h.connect(t, testenv.ScramUser, "orders")
	s2 := h.connect(t, testenv.MD5User, "orders")
	works := func(c *pgx.Conn, what string) {
		t.Helper()
		var one int
		if err := c.QueryRow(ctx, "select 1").Scan(&one); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	}
	if e := connectErr(t, h.dsn(testenv.PasswordUser, "orders")); e.Code != broker.CodeInvalidAuthorization {
		t.Fatalf("ungranted role: %s %s", e.Code, e.Message)
	}

	t.Run("valid file adds a grant without dropping sessions", func(t *testing.T) {
		writeReloadConfig(t, h, []string{testenv.ScramUser, testenv.MD5User, testenv.PasswordUser}, "", "")
		if err := h.agent.Reload(); err != nil {
			t.Fatal(err)
		}
		c := h.connect(t, testenv.PasswordUser, "orders")
		works(c, "newly granted role")
		works(s1, "session open across the reload")
		works(s2, "other session open across the reload")
	})

	t.Run("invalid file keeps the running configuration and names every problem", func(t *testing.T) {
		writeReloadConfig(t, h, []string{testenv.ScramUser}, "  - { principal: ghost, upstream: orders, roles: [x] }\n", `shutdown: { grace: -1s }
limits: { auth_rate: -5 }
`)
		// Also a bad TLS mode on a second upstream.
		path := h.agent.cfgPath
		b, _ := os.ReadFile(path)
		b = []byte(strings.Replace(string(b), "secrets: {", "  other: { address: \"db:5432\", tls: { mode: bogus } }\nsecrets: {", 1))
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
		err := h.agent.Reload()
		if err == nil {
			t.Fatal("an invalid file was accepted")
		}
		for _, want := range []string{"ghost", "shutdown.grace", "bogus", "limits"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("reload error does not mention %q:\n%v", want, err)
			}
		}
		if !strings.Contains(err.Error(), "pgward.yaml:") {
			t.Errorf("reload error has no line numbers:\n%v", err)
		}
		// Nothing changed: the role the bad file would revoke still works.
		works(s2, "session after a refused reload")
		c := h.connect(t, testenv.PasswordUser, "orders")
		works(c, "grant of the running configuration")
	})

	t.Run("revoking a grant ends only the affected sessions", func(t *testing.T) {
		writeReloadConfig(t, h, []string{testenv.MD5User, testenv.PasswordUser}, "", "")
		if err := h.agent.Reload(); err != nil {
			t.Fatal(err)
		}
		_, err := s1.Exec(ctx, "select 1")
		var pe *pgconn.PgError
		if err == nil {
			t.Fatal("a session whose grant was revoked still works")
		}
		if errors.As(err, &pe) && pe.Code != broker.CodeInvalidAuthorization {
			t.Fatalf("revoked session ended with %s %s", pe.Code, pe.Message)
		}
		works(s2, "session whose grant still holds")
		eventually(t, "the audit record of the revoked session", func() bool {
			ev := sessionEnd(t, h, testenv.ScramUser)
			return ev != nil && ev["reason"] == "grant_revoked"
		})
		if ev := sessionEnd(t, h, testenv.MD5User); ev != nil {
			t.Fatalf("an untouched session has an end record: %v", ev)
		}
		if e := connectErr(t, h.dsn(testenv.ScramUser, "orders")); e.Code != broker.CodeInvalidAuthorization {
			t.Fatalf("revoked role connects: %s %s", e.Code, e.Message)
		}
	})
}

// The real binary under a pretend systemd: NOTIFY_SOCKET (abstract) and
// WATCHDOG_USEC set; READY=1, WATCHDOG=1, RELOADING=1, STOPPING=1 arrive;
// SIGHUP with a bad file keeps running and logs every problem; `pgward
// reload --pid` applies a good one; the first SIGTERM drains, a second
// exits at once; with nothing open, SIGTERM exits 0.
func TestBinaryLifecycle(t *testing.T) {
	pg := testenv.SharedPostgres(t)
	bin := buildPgward(t)
	dir, err := os.MkdirTemp("", "pgwb-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	secretsPath := filepath.Join(dir, "secrets.yaml")
	if err := os.WriteFile(secretsPath, fmt.Appendf(nil, "orders:\n  %s: { password: %s }\n  %s: { password: %s }\n",
		testenv.ScramUser, testenv.ScramPassword, testenv.MD5User, testenv.MD5Password), 0o600); err != nil {
		t.Fatal(err)
	}
	cfgPath := filepath.Join(dir, "pgward.yaml")
	writeCfg := func(roles, extra string) {
		text := fmt.Sprintf(`listen: { unix_dir: %q }
upstreams:
  orders: { address: %q, database: %q, auth: [scram-sha-256, md5] }
secrets: { backend: file, file: { path: %q } }
principals:
  me: { match: { uid: [%d] } }
grants:
  - { principal: me, upstream: orders, roles: [%s] }
%saudit: { path: %q }
ebpf: { enabled: "false" }
shutdown: { grace: 30s }
`, dir, pg.SocketPath(), testenv.Database, secretsPath, os.Getuid(), roles, extra, filepath.Join(dir, "audit.jsonl"))
		if err := os.WriteFile(cfgPath, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	dsn := func(user string) string {
		return fmt.Sprintf("host=%s port=5432 user=%s dbname=orders sslmode=disable connect_timeout=10", dir, user)
	}
	ctx := context.Background()

	start := func(t *testing.T) (*exec.Cmd, *notifyListener, *testenv.SyncBuffer, chan error) {
		t.Helper()
		name := fmt.Sprintf("@pgward-test-notify-%d-%d", os.Getpid(), time.Now().UnixNano())
		l := listenNotify(t, name)
		cmd := exec.Command(bin, "agent", "--config", cfgPath)
		cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+name, "WATCHDOG_USEC=300000", "PGWARD_LOG_FORMAT=json")
		stderr := &testenv.SyncBuffer{}
		cmd.Stderr = stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		t.Cleanup(func() {
			if cmd.ProcessState == nil {
				_ = cmd.Process.Kill()
				<-done
			}
		})
		l.expect(t, "READY=1", 20*time.Second)
		// Keep-alives every WATCHDOG_USEC/2.
		l.expect(t, "WATCHDOG=1", 2*time.Second)
		l.expect(t, "WATCHDOG=1", 2*time.Second)
		return cmd, l, stderr, done
	}
	wait := func(t *testing.T, done chan error, within time.Duration) (int, time.Duration) {
		t.Helper()
		st := time.Now()
		select {
		case err := <-done:
			var ee *exec.ExitError
			if err != nil && !errors.As(err, &ee) {
				t.Fatal(err)
			}
			if ee != nil {
				return ee.ExitCode(), time.Since(st)
			}
			return 0, time.Since(st)
		case <-time.After(within):
			t.Fatalf("pgward did not exit within %v", within)
		}
		return -1, 0
	}

	t.Run("reload and a second SIGTERM", func(t *testing.T) {
		writeCfg(testenv.ScramUser, "")
		cmd, l, stderr, done := start(t)
		c, err := pgx.Connect(ctx, dsn(testenv.ScramUser))
		if err != nil {
			t.Fatalf("connect through the binary: %v", err)
		}
		defer c.Close(ctx)

		// SIGHUP with a file that has two problems: both logged, still running.
		writeCfg(testenv.ScramUser+", "+testenv.MD5User, "  - { principal: ghost, upstream: nowhere, roles: [x] }\n")
		if err := cmd.Process.Signal(syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
		l.expect(t, "RELOADING=1", 5*time.Second)
		l.expect(t, "READY=1", 5*time.Second)
		eventually(t, "the refused reload in the log", func() bool { return strings.Contains(stderr.String(), "reload refused") })
		for _, want := range []string{`ghost`, `nowhere`} {
			if !strings.Contains(stderr.String(), want) {
				t.Errorf("log of the refused reload lacks %q:\n%s", want, stderr.String())
			}
		}
		if e := connectErr(t, dsn(testenv.MD5User)); e.Code != broker.CodeInvalidAuthorization {
			t.Fatalf("grant of the refused file in effect: %s", e.Code)
		}

		// pgward reload --pid with a good file.
		writeCfg(testenv.ScramUser+", "+testenv.MD5User, "")
		if out, err := exec.Command(bin, "reload", "--pid", fmt.Sprint(cmd.Process.Pid)).CombinedOutput(); err != nil {
			t.Fatalf("pgward reload: %v %s", err, out)
		}
		l.expect(t, "RELOADING=1", 5*time.Second)
		l.expect(t, "READY=1", 5*time.Second)
		c2, err := pgx.Connect(ctx, dsn(testenv.MD5User))
		if err != nil {
			t.Fatalf("role granted by reload: %v", err)
		}
		c2.Close(ctx)
		if _, err := c.Exec(ctx, "select 1"); err != nil {
			t.Fatalf("session across reloads: %v", err)
		}

		// First SIGTERM: drains (a session is open, grace 30 s).
		if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		l.expect(t, "STOPPING=1", 5*time.Second)
		select {
		case err := <-done:
			t.Fatalf("exited while a session was open and the grace period running: %v\n%s", err, stderr.String())
		case <-time.After(500 * time.Millisecond):
		}
		if _, err := c.Exec(ctx, "select 1"); err != nil {
			t.Fatalf("open session during the drain: %v", err)
		}
		// Second SIGTERM: out now.
		if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		code, el := wait(t, done, 5*time.Second)
		if code != exitFailureCode || el > 2*time.Second {
			t.Fatalf("second SIGTERM: exit %d after %v, want %d at once\n%s", code, el, exitFailureCode, stderr.String())
		}
	})

	t.Run("SIGTERM with nothing open exits 0 and flushes the audit log", func(t *testing.T) {
		writeCfg(testenv.ScramUser, "")
		cmd, l, stderr, done := start(t)
		ends := countEvents(t, filepath.Join(dir, "audit.jsonl"), "db.session.end")
		c, err := pgx.Connect(ctx, dsn(testenv.ScramUser))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Exec(ctx, "select 'audited'"); err != nil {
			t.Fatal(err)
		}
		c.Close(ctx)
		eventually(t, "the session to end", func() bool { return countEvents(t, filepath.Join(dir, "audit.jsonl"), "db.session.end") > ends })
		if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		l.expect(t, "STOPPING=1", 5*time.Second)
		if code, el := wait(t, done, 10*time.Second); code != 0 || el > 5*time.Second {
			t.Fatalf("exit %d after %v, want 0\n%s", code, el, stderr.String())
		}
		out, err := exec.Command(bin, "audit", "verify", filepath.Join(dir, "audit.jsonl")).CombinedOutput()
		if err != nil {
			t.Fatalf("audit verify after shutdown: %v %s", err, out)
		}
	})
}

const exitFailureCode = 1 // cmd/pgward's exitFailure

func countEvents(t *testing.T, path, event string) int {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		return 0
	}
	defer f.Close()
	n := 0
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<24)
	for sc.Scan() {
		if strings.Contains(sc.Text(), `"event":"`+event+`"`) {
			n++
		}
	}
	return n
}

// buildPgward builds cmd/pgward into a temporary directory.
func buildPgward(t *testing.T) string {
	t.Helper()
	goBin, err := exec.LookPath("go")
	if err != nil {
		testenv.SkipUnlessCI(t, "no go toolchain to build pgward: %v", err)
	}
	out := filepath.Join(t.TempDir(), "pgward")
	cmd := exec.Command(goBin, "build", "-o", out, "./cmd/pgward")
	cmd.Dir = ".."
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build ./cmd/pgward: %v\n%s", err, b)
	}
	return out
}

// deploy/systemd/pgward.service passes systemd-analyze verify, and its
// seccomp filter does not deny the system calls eBPF needs.
func TestSystemdUnit(t *testing.T) {
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		testenv.SkipUnlessCI(t, "systemd-analyze not installed (apt-get install systemd, as .ci/install.sh does); cannot verify the unit")
	}
	unit, err := os.ReadFile(filepath.Join("..", "deploy", "systemd", "pgward.service"))
	if err != nil {
		t.Fatal(err)
	}
	text := string(unit)
	// verify checks that ExecStart's binary exists: stand in this test binary.
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "pgward.service")
	if err := os.WriteFile(path, []byte(strings.ReplaceAll(text, "/usr/local/bin/pgward", self)), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(analyze, "verify", path).CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}

	keys := map[string][]string{}
	for _, l := range strings.Split(text, "\n") {
		if k, v, ok := strings.Cut(l, "="); ok && !strings.HasPrefix(l, "#") {
			keys[k] = append(keys[k], v)
		}
	}
	for k, want := range map[string]string{
		"Type": "notify", "RuntimeDirectory": "pgward pgward-admin", "LogsDirectory": "pgward",
		"ExecReload": "/bin/kill -HUP $MAINPID", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
		"CapabilityBoundingSet":   "CAP_BPF CAP_PERFMON CAP_NET_ADMIN CAP_SYS_PTRACE",
		"RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6 AF_NETLINK",
	} {
		if got := keys[k]; len(got) != 1 || got[0] != want {
			t.Errorf("%s=%q, want %q", k, got, want)
		}
	}
	if stop, err := time.ParseDuration(strings.Join(keys["TimeoutStopSec"], "")); err != nil || stop <= DefaultGrace {
		t.Errorf("TimeoutStopSec=%v must exceed the default shutdown.grace %v", keys["TimeoutStopSec"], DefaultGrace)
	}
	needed := []string{"bpf", "perf_event_open"}
	for _, f := range keys["SystemCallFilter"] {
		allow := !strings.HasPrefix(f, "~")
		for _, item := range strings.Fields(strings.TrimPrefix(f, "~")) {
			members := []string{item}
			if strings.HasPrefix(item, "@") {
				out, err := exec.Command(analyze, "syscall-filter", item).Output()
				if err != nil {
					t.Fatalf("syscall-filter %s: %v", item, err)
				}
				members = strings.Fields(string(out))
			}
			for _, sc := range needed {
				if slices.Contains(members, sc) {
					if allow {
						needed = slices.DeleteFunc(needed, func(s string) bool { return s == sc })
					} else {
						t.Errorf("SystemCallFilter=%s denies %s, which eBPF needs", f, sc)
					}
				}
			}
		}
	}
	if len(needed) > 0 {
		t.Errorf("SystemCallFilter does not allow %v", needed)
	}
}
