package agent

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/pgward/pgward/testenv"
)

// Issue 14 with drivers other than pgx and psql: psycopg 3 (Python, over
// libpq) and PgJDBC (Java, its own protocol implementation), from Debian's
// packages (python3-psycopg, libpostgresql-jdbc-java with
// default-jdk-headless; .ci/install.sh installs them). Each session runs
// in a child process (testdata/drivers/probe.py, Probe.java) that prints
// what the driver saw as one JSON line; every case is compared with the same
// driver connected to the server directly where the answer is the server's.

// probeResult is the JSON line of a probe.
type probeResult struct {
	Driver  string       `json:"driver"`
	Connect probeOutcome `json:"connect"`
	Results []probeOutcome
}

type probeOutcome struct {
	OK       bool        `json:"ok"`
	SQLState string      `json:"sqlstate"`
	Message  string      `json:"message"`
	Rows     [][]*string `json:"rows"`
}

// value is the single value of result i, or fails the test.
func (r probeResult) value(t *testing.T, i int) string {
	t.Helper()
	if !r.Connect.OK {
		t.Fatalf("%s: connect failed: %s %s", r.Driver, r.Connect.SQLState, r.Connect.Message)
	}
	if i >= len(r.Results) || len(r.Results[i].Rows) != 1 || len(r.Results[i].Rows[0]) != 1 || r.Results[i].Rows[0][0] == nil {
		t.Fatalf("%s: result %d is not one value: %+v", r.Driver, i, r.Results)
	}
	return *r.Results[i].Rows[0][0]
}

// sqlstate is the SQLSTATE of result i ("" when it succeeded).
func (r probeResult) sqlstate(t *testing.T, i int) string {
	t.Helper()
	if !r.Connect.OK {
		t.Fatalf("%s: connect failed: %s %s", r.Driver, r.Connect.SQLState, r.Connect.Message)
	}
	if i >= len(r.Results) {
		t.Fatalf("%s: no result %d: %+v", r.Driver, i, r.Results)
	}
	return r.Results[i].SQLState
}

// runProbe runs a probe and returns its JSON lines, one per session.
func runProbe(t *testing.T, cmd *exec.Cmd) []probeResult {
	t.Helper()
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(cmd.Args, " "), err, stderr.String())
	}
	var rs []probeResult
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		var r probeResult
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			t.Fatalf("probe output %q: %v\n%s", line, err, stderr.String())
		}
		rs = append(rs, r)
	}
	return rs
}

func probeDir(t *testing.T) string {
	t.Helper()
	d, err := filepath.Abs("testdata/drivers")
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// psycopgPython returns a python3 that can import psycopg (Debian's
// python3-psycopg installs it for /usr/bin/python3).
func psycopgPython(t *testing.T) string {
	t.Helper()
	cands := []string{"/usr/bin/python3"}
	if p, err := exec.LookPath("python3"); err == nil {
		cands = append(cands, p)
	}
	for _, p := range cands {
		if exec.Command(p, "-c", "import psycopg").Run() == nil {
			return p
		}
	}
	testenv.SkipUnlessCI(t, "psycopg 3 is not installed: apt-get install python3-psycopg (make deps)")
	return ""
}

// psycopg runs probe.py: one session with conninfo and env (added to the
// environment; libpq reads PGTZ, PGDATESTYLE, PGGEQO into startup
// parameters), running sqls.
func psycopg(t *testing.T, py, conninfo string, env []string, sqls ...string) probeResult {
	t.Helper()
	cmd := testenv.RunAs(uint32(os.Getuid()), uint32(os.Getgid()), py, append([]string{filepath.Join(probeDir(t), "probe.py"), conninfo}, sqls...)...)
	cmd.Env = append(cmd.Env, env...)
	return runProbe(t, cmd)[0]
}

// pgjdbcJar is Debian's libpostgresql-jdbc-java.
const pgjdbcJar = "/usr/share/java/postgresql.jar"

// jdbcClasses compiles Probe.java (about 2 s) and returns the class path
// for it and PgJDBC.
func jdbcClasses(t *testing.T) string {
	t.Helper()
	_, errJava := exec.LookPath("java")
	_, errJavac := exec.LookPath("javac")
	_, errJar := os.Stat(pgjdbcJar)
	if errJava != nil || errJavac != nil || errJar != nil {
		testenv.SkipUnlessCI(t, "PgJDBC needs java, javac and %s: apt-get install default-jdk-headless libpostgresql-jdbc-java (make deps)", pgjdbcJar)
	}
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("javac", "-d", dir, "-cp", pgjdbcJar, filepath.Join(probeDir(t), "Probe.java")).CombinedOutput(); err != nil {
		t.Fatalf("javac Probe.java: %v\n%s", err, out)
	}
	return dir + ":" + pgjdbcJar
}

// jdbcTarget says where PgJDBC connects: the socket file (pgward's, or the
// server's), database, user and password.
type jdbcTarget struct {
	socket, db, user, password string
}

func (h *harness) jdbcVia(via string) jdbcTarget {
	if via == "direct" {
		return jdbcTarget{h.pg.SocketPath(), testenv.Database, testenv.ScramUser, testenv.ScramPassword}
	}
	return jdbcTarget{filepath.Join(h.dir, ".s.PGSQL.5432"), "orders", testenv.ScramUser, ""}
}

// jdbcSession is one PgJDBC session: where to, the connection properties
// (key=value) and the statements.
type jdbcSession struct {
	to    jdbcTarget
	props []string
	sqls  []string
}

// jdbc runs the sessions one after the other in one JVM (a JVM takes
// longer to start than a session) and returns what each saw.
func jdbc(t *testing.T, cp string, sessions ...jdbcSession) []probeResult {
	t.Helper()
	args := []string{"-Xshare:auto", "-XX:TieredStopAtLevel=1", "-cp", cp, "Probe"}
	for i, s := range sessions {
		if i > 0 {
			args = append(args, "++")
		}
		args = append(args, "jdbc:postgresql://localhost:5432/"+s.to.db,
			"user="+s.to.user, "sslmode=disable", "gssEncMode=disable", "connectTimeout=15",
			"socketFactory=Probe$UnixSocketFactory", "socketFactoryArg="+s.to.socket)
		if s.to.password != "" {
			args = append(args, "password="+s.to.password)
		}
		args = append(append(append(args, s.props...), "--"), s.sqls...)
	}
	rs := runProbe(t, testenv.RunAs(uint32(os.Getuid()), uint32(os.Getgid()), "java", args...))
	if len(rs) != len(sessions) {
		t.Fatalf("PgJDBC probe: %d results for %d sessions", len(rs), len(sessions))
	}
	return rs
}

// jdbc1 is one session of jdbc.
func jdbc1(t *testing.T, cp string, to jdbcTarget, props []string, sqls ...string) probeResult {
	t.Helper()
	return jdbc(t, cp, jdbcSession{to, props, sqls})[0]
}

const (
	sqlAppName = "select application_name from pg_stat_activity where pid = pg_backend_pid()"
	sqlPID     = "select pg_backend_pid()::text"
)

// checkParams asserts what a session opened with default_transaction_read_only=on,
// statement_timeout=1s and work_mem=1234kB shows, after running
// "show transaction_read_only", "show work_mem", "select pg_sleep(10)" and
// "create temp table …". The timeout is a second, not a millisecond: a
// backend descheduled for a millisecond on a loaded machine cancels any
// statement under 1ms (the create table got 57014, not 25006, under -race
// with CPU load).
func checkParams(t *testing.T, r probeResult) {
	t.Helper()
	if v := r.value(t, 0); v != "on" {
		t.Errorf("%s: transaction_read_only = %q, want on", r.Driver, v)
	}
	if v := r.value(t, 1); v != "1234kB" {
		t.Errorf("%s: work_mem = %q, want 1234kB", r.Driver, v)
	}
	if c := r.sqlstate(t, 2); c != "57014" {
		t.Errorf("%s: pg_sleep(10) with statement_timeout=1s: SQLSTATE %q, want 57014", r.Driver, c)
	}
	if c := r.sqlstate(t, 3); c != "25006" {
		t.Errorf("%s: create table in a read-only session: SQLSTATE %q, want 25006", r.Driver, c)
	}
}

var paramSQL = []string{"show transaction_read_only", "show work_mem", "select pg_sleep(10)", "create temp table t14 (i int)"}

// checkAppName asserts that application_name in pg_stat_activity is the
// client's name and the request_id of the last db.session.start.
func checkAppName(t *testing.T, h *harness, r probeResult, i int, app string) {
	t.Helper()
	got := r.value(t, i)
	want := "pgward:me:" + lastSessionStart(t, h)
	if app != "" {
		want = app + " " + want
	}
	if got != want {
		t.Errorf("%s: pg_stat_activity.application_name = %q, want %q", r.Driver, got, want)
	}
}

// fatalText is the server's message in libpq's connection error
// ("connection to server on socket … failed: FATAL:  <message>").
var fatalText = regexp.MustCompile(`FATAL:\s+(.*)`)

func TestPsycopgThroughPgward(t *testing.T) {
	py := psycopgPython(t)
	h := newHarness(t, nil)
	pgw := func(extra ...string) string { return h.dsn(testenv.ScramUser, "orders", extra...) }
	direct := func(extra ...string) string {
		return strings.Join(append([]string{h.pg.DSN(testenv.ScramUser, testenv.ScramPassword, testenv.Database)}, extra...), " ")
	}

	t.Run("startup parameters", func(t *testing.T) {
		opts := "options='-c default_transaction_read_only=on -c statement_timeout=1s -c work_mem=1234kB'"
		checkParams(t, psycopg(t, py, pgw(opts), nil, paramSQL...))
		// libpq sends PGGEQO and PGTZ as the startup parameters geqo and
		// timezone, not in options.
		r := psycopg(t, py, pgw(), []string{"PGGEQO=off", "PGTZ=Asia/Tokyo"}, "show geqo", "show timezone")
		if g, tz := r.value(t, 0), r.value(t, 1); g != "off" || tz != "Asia/Tokyo" {
			t.Errorf("%s: geqo=%q timezone=%q, want off and Asia/Tokyo", r.Driver, g, tz)
		}
	})

	t.Run("refused as directly", func(t *testing.T) {
		for _, opt := range []string{"options='-c nosuch_param=1'", "options='-c statement_timeout=banana'"} {
			want := psycopg(t, py, direct(opt), nil).Connect
			got := psycopg(t, py, pgw(opt), nil).Connect
			w, g := fatalText.FindStringSubmatch(want.Message), fatalText.FindStringSubmatch(got.Message)
			if got.OK || w == nil || g == nil || g[1] != w[1] {
				t.Errorf("%s: through pgward %+v; directly %+v", opt, got, want)
			}
		}
	})

	t.Run("target_session_attrs", func(t *testing.T) {
		for _, tc := range []struct {
			extra string
			ok    bool
		}{
			{"options='-c default_transaction_read_only=on' target_session_attrs=read-write", false},
			{"options='-c default_transaction_read_only=on' target_session_attrs=read-only", true},
			{"target_session_attrs=read-write", true},
			{"target_session_attrs=read-only", false},
		} {
			for via, dsn := range map[string]string{"direct": direct(tc.extra), "pgward": pgw(tc.extra)} {
				r := psycopg(t, py, dsn, nil, "show transaction_read_only")
				if r.Connect.OK != tc.ok {
					t.Errorf("%s %s: connect %+v, want success %v", tc.extra, via, r.Connect, tc.ok)
				}
			}
		}
	})

	t.Run("application_name", func(t *testing.T) {
		r := psycopg(t, py, pgw("application_name=py-billing"), nil, sqlAppName, "show application_name")
		checkAppName(t, h, r, 0, "py-billing")
		checkAppName(t, h, r, 1, "py-billing")
	})
}

// TestPsycopgReuse: on a reused upstream connection psycopg's startup
// parameters (geqo and timezone from PGGEQO and PGTZ, application_name)
// apply, and the next session inherits none of them.
func TestPsycopgReuse(t *testing.T) {
	py := psycopgPython(t)
	h := reuseHarness(t)
	r1 := psycopg(t, py, h.dsn(testenv.ScramUser, "orders", "application_name=first"), []string{"PGGEQO=off", "PGTZ=Asia/Tokyo"},
		sqlPID, "show geqo", "show timezone", sqlAppName)
	if g, tz := r1.value(t, 1), r1.value(t, 2); g != "off" || tz != "Asia/Tokyo" {
		t.Errorf("first session: geqo=%q timezone=%q, want off and Asia/Tokyo", g, tz)
	}
	checkAppName(t, h, r1, 3, "first")
	waitIdle(t, h, 1)
	r2 := psycopg(t, py, h.dsn(testenv.ScramUser, "orders"), nil, sqlPID, "show geqo", "show timezone", sqlAppName)
	if p1, p2 := r1.value(t, 0), r2.value(t, 0); p1 != p2 {
		t.Fatalf("second session on backend %s, want the parked %s", p2, p1)
	}
	if g, tz := r2.value(t, 1), r2.value(t, 2); g != "on" || tz == "Asia/Tokyo" {
		t.Errorf("second session inherited geqo=%q timezone=%q", g, tz)
	}
	checkAppName(t, h, r2, 3, "")
}

func TestJDBCThroughPgward(t *testing.T) {
	cp := jdbcClasses(t)
	h := newHarness(t, nil)
	pgw, direct := h.jdbcVia("pgward"), h.jdbcVia("direct")

	t.Run("startup parameters", func(t *testing.T) {
		// PgJDBC sends currentSchema as the startup parameter search_path.
		schema := []string{"currentSchema=pg_catalog,public"}
		rs := jdbc(t, cp,
			jdbcSession{pgw, []string{"options=-c default_transaction_read_only=on -c statement_timeout=1s -c work_mem=1234kB"}, paramSQL},
			jdbcSession{direct, schema, []string{"show search_path"}},
			jdbcSession{pgw, schema, []string{"show search_path"}})
		checkParams(t, rs[0])
		if want, got := rs[1].value(t, 0), rs[2].value(t, 0); got != want || !strings.HasPrefix(got, "pg_catalog,") {
			t.Errorf("%s: search_path = %q, directly %q", rs[2].Driver, got, want)
		}
	})

	t.Run("refused as directly", func(t *testing.T) {
		opts := []string{"options=-c nosuch_param=1", "options=-c statement_timeout=banana"}
		var sessions []jdbcSession
		for _, opt := range opts {
			sessions = append(sessions, jdbcSession{direct, []string{opt}, nil}, jdbcSession{pgw, []string{opt}, nil})
		}
		rs := jdbc(t, cp, sessions...)
		for i, opt := range opts {
			want, got := rs[2*i].Connect, rs[2*i+1].Connect
			if got.OK || want.SQLState == "" || got.SQLState != want.SQLState || got.Message != want.Message {
				t.Errorf("%s: through pgward %+v; directly %+v", opt, got, want)
			}
		}
	})

	t.Run("targetServerType", func(t *testing.T) {
		cases := []struct {
			props []string
			ok    bool
		}{
			{[]string{"options=-c default_transaction_read_only=on", "targetServerType=primary"}, false},
			{[]string{"options=-c default_transaction_read_only=on", "targetServerType=secondary"}, true},
			{[]string{"targetServerType=primary"}, true},
			{[]string{"targetServerType=secondary"}, false},
		}
		var sessions []jdbcSession
		for _, tc := range cases {
			for _, to := range []jdbcTarget{direct, pgw} {
				sessions = append(sessions, jdbcSession{to, tc.props, []string{"show transaction_read_only"}})
			}
		}
		rs := jdbc(t, cp, sessions...)
		for i, r := range rs {
			if tc := cases[i/2]; r.Connect.OK != tc.ok {
				t.Errorf("%v %s: connect %+v, want success %v", tc.props, []string{"direct", "pgward"}[i%2], r.Connect, tc.ok)
			}
		}
	})

	t.Run("application_name", func(t *testing.T) {
		// With assumeMinServerVersion of 9.0 or more, PgJDBC sends
		// ApplicationName as the startup parameter application_name.
		r := jdbc1(t, cp, pgw, []string{"ApplicationName=jdbc-billing", "assumeMinServerVersion=9.0"}, sqlAppName, "show application_name")
		checkAppName(t, h, r, 0, "jdbc-billing")
		checkAppName(t, h, r, 1, "jdbc-billing")
		// Without it, PgJDBC sends SET application_name after the login,
		// which replaces pgward's value as any SET does (docs/config.md).
		r = jdbc1(t, cp, pgw, []string{"ApplicationName=jdbc-billing"}, sqlAppName)
		if v := r.value(t, 0); v != "jdbc-billing" {
			t.Errorf("%s without assumeMinServerVersion: application_name = %q, want its own SET's jdbc-billing", r.Driver, v)
		}
	})
}

// PgJDBC with a fetch size in a transaction binds a named portal and
// fetches from it with row-limited Executes; statements run between the
// fetches put a guard in front of each later Execute (broker/verify.go).
// The rows are the server's, as directly, and every Execute of the portal
// is audited with the query's text and succeeds.
func TestJDBCFetchSizeInterleaved(t *testing.T) {
	cp := jdbcClasses(t)
	h := newHarness(t, nil)
	pgw, direct := h.jdbcVia("pgward"), h.jdbcVia("direct")
	for _, threshold := range []string{"1", "5"} {
		t.Run("prepareThreshold="+threshold, func(t *testing.T) {
			outer := "select g::text from generate_series(1, 7) g where g > 0 /* fetch-" + threshold + " */"
			spec := "interleave:2:" + outer + "|select 'between'"
			props := []string{"prepareThreshold=" + threshold}
			rs := jdbc(t, cp, jdbcSession{direct, props, []string{spec}}, jdbcSession{pgw, props, []string{spec}})
			want, got := rs[0].Results, rs[1].Results
			if len(want) != 1 || len(want[0].Rows) != 7 || !want[0].OK && want[0].SQLState != "" {
				t.Fatalf("directly: %+v", want)
			}
			wj, _ := json.Marshal(want)
			gj, _ := json.Marshal(got)
			if string(wj) != string(gj) {
				t.Fatalf("through pgward %s; directly %s", gj, wj)
			}
			var execs int
			deadline := time.Now().Add(10 * time.Second)
			for {
				execs = 0
				evs := h.auditEvents(t)
				results := map[uint64]map[string]any{}
				for _, ev := range evs {
					if ev["event"] == "db.session.query.result" {
						results[num(ev["query_ei"])] = ev
					}
				}
				bad := ""
				for _, ev := range evs {
					if ev["event"] != "db.session.query" || ev["db_query"] != outer || ev["bind_only"] == true {
						continue
					}
					if !strings.HasPrefix(asString(ev["portal_name"]), "C_") {
						t.Fatalf("PgJDBC did not use a named portal: %v", ev)
					}
					execs++
					if r := results[num(ev["ei"])]; r == nil || r["success"] != true || ev["portal_unverified"] != nil {
						bad = fmt.Sprintf("Execute %v, result %v", ev, r)
					}
				}
				if bad == "" && execs == 4 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("%d Executes of the portal audited, want 4 (7 rows, 2 a fetch); %s", execs, bad)
				}
				time.Sleep(50 * time.Millisecond)
			}
		})
	}
}

// TestJDBCReuse: on a reused upstream connection PgJDBC's startup
// parameters (search_path from currentSchema, application_name) apply,
// and the next session inherits none of them.
func TestJDBCReuse(t *testing.T) {
	cp := jdbcClasses(t)
	h := reuseHarness(t)
	pgw := h.jdbcVia("pgward")
	r1 := jdbc1(t, cp, pgw, []string{"currentSchema=pg_catalog", "ApplicationName=first", "assumeMinServerVersion=9.0"},
		sqlPID, "show search_path", sqlAppName)
	if v := r1.value(t, 1); v != "pg_catalog" {
		t.Errorf("first session: search_path = %q, want pg_catalog", v)
	}
	checkAppName(t, h, r1, 2, "first")
	waitIdle(t, h, 1)
	r2 := jdbc1(t, cp, pgw, []string{"ApplicationName=second", "assumeMinServerVersion=9.0"}, sqlPID, "show search_path", sqlAppName)
	if p1, p2 := r1.value(t, 0), r2.value(t, 0); p1 != p2 {
		t.Fatalf("second session on backend %s, want the parked %s", p2, p1)
	}
	if v := r2.value(t, 1); v != `"$user", public` {
		t.Errorf("second session: search_path = %q, want the default", v)
	}
	checkAppName(t, h, r2, 2, "second")
}
