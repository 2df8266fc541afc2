package agent

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgward/pgward/bpf"
	"github.com/pgward/pgward/exporter"
	"github.com/pgward/pgward/testenv"
)

// refusedStartup sends one StartupMessage for a role the caller holds no
// grant for (testenv.RefusedStartup).
func refusedStartup(socket string) (bool, error) {
	return testenv.RefusedStartup(socket, "no_grant_role", "orders")
}

// A caller without a grant looping on refused startups: the audit trail
// grows by a bounded number of bytes per second whatever the rate (full
// events within the allowance, then db.refusal.summary counts), the chain
// holds, and the metrics count every attempt. On a pgward that audits every
// refusal in full the bound is exceeded a hundredfold.
func TestRefusedFloodAuditBounded(t *testing.T) {
	h := newHarness(t, func(h *harness, c *Config) {
		info := slog.LevelInfo // a debug line per refusal would slow the flood
		h.logLevel = &info
	})
	// Let the harness's own start-up lines settle.
	before := fileSize(t, h.auditPath)
	const flood = 4 * time.Second
	var attempts, refused atomic.Int64
	start := time.Now()
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Since(start) < flood {
				ok, err := refusedStartup(h.agent.SocketPath())
				attempts.Add(1)
				if err != nil {
					t.Errorf("refused startup: %v", err)
					return
				}
				if ok {
					refused.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	grown := fileSize(t, h.auditPath) - before
	n := attempts.Load()
	rate := float64(grown) / elapsed.Seconds()
	t.Logf("%d refused startups in %v (%.0f/s); audit grew %d bytes: %.0f bytes/s", n, elapsed.Round(time.Millisecond),
		float64(n)/elapsed.Seconds(), grown, rate)
	if n < 200 {
		t.Fatalf("only %d attempts in %v: the flood is too slow to prove anything", n, flood)
	}
	if refused.Load() != n {
		t.Fatalf("%d of %d attempts got an ErrorResponse", refused.Load(), n)
	}
	// Within the allowance: 10 full events at once, then 1 per second
	// (about 1.3 KB each), plus summaries. 8 KB/s is a generous bound.
	const bound = 8 << 10
	if rate > bound {
		t.Errorf("audit grew %.0f bytes/s under a refused flood; want at most %d", rate, bound)
	}
	// Metrics count every attempt.
	if got := scrapeCounter(t, h, "pgward_auth_failures_total", `reason="unauthorized"`); got != float64(n) {
		t.Errorf("pgward_auth_failures_total{reason=unauthorized} = %v, want %d", got, n)
	}
	if got := scrapeCounter(t, h, "pgward_requests_total", ""); got < float64(n) {
		t.Errorf("pgward_requests_total = %v, want at least %d", got, n)
	}
	summarized := scrapeCounter(t, h, "pgward_audit_refusals_summarized_total", "")

	// Stopping writes the pending summary; every refusal is accounted for.
	h.stop()
	if _, err := exporter.VerifyFiles(h.auditPath); err != nil {
		t.Fatalf("audit chain: %v", err)
	}
	var full, counted int64
	for _, ev := range h.auditEvents(t) {
		switch ev["event"] {
		case "db.session.start":
			if ev["success"] == false && ev["db_user"] == "no_grant_role" {
				full++
			}
		case "db.refusal.summary":
			if ev["refused"] != "db.session.start" || ev["reason"] != "unauthorized" || ev["code"] != "PGW08W" {
				t.Errorf("summary %v", ev)
			}
			if ev["first_time"] == nil || ev["last_time"] == nil || ev["process"] == nil {
				t.Errorf("summary without times or process: %v", ev)
			}
			c, _ := ev["count"].(float64)
			counted += int64(c)
		}
	}
	t.Logf("full refusal events %d, summarised %d (metric %v)", full, counted, summarized)
	if full+counted != n {
		t.Errorf("full events %d + summarised %d = %d, want every attempt (%d)", full, counted, full+counted, n)
	}
	if float64(counted) != summarized {
		t.Errorf("summaries count %d, pgward_audit_refusals_summarized_total %v", counted, summarized)
	}
}

func fileSize(t *testing.T, path string) int64 {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Size()
}

// TestSlotFloodProcess is the process TestLoginSlotsPerUID runs as another
// uid: it opens PGWARD_SLOT_FLOOD="<socket> <n>" connections, sends nothing
// on them and holds them until the parent lets it go.
func TestSlotFloodProcess(t *testing.T) {
	spec := os.Getenv(testenv.EnvSlotFlood)
	if spec == "" {
		return // not a test: the flooding process of TestLoginSlotsPerUID, run by it with its variable set (a skip would fail make test under CI=true)
	}
	testenv.SlotFlood(spec)
}

// One uid holding idle sockets before authentication must not lock out the
// apps of other uids: it gets limits.connections_per_uid login slots (by
// default listen.max_connections/10, at least 16); a granted client of
// another uid still logs in and queries; the 53300 refusals are counted by
// reason and logged with the caller's uid and pid.
func TestLoginSlotsPerUID(t *testing.T) {
	testenv.RequireRoot(t)
	const maxConns, flood = 40, 60
	h := newHarness(t, func(h *harness, c *Config) {
		c.Listen.MaxConnections = maxConns
		c.Listen.LoginTimeout = 30 * time.Second
	})
	uid := testenv.UnprivilegedIDs(t, 1)[0]
	bin, err := testenv.TestBinary()
	if err != nil {
		t.Fatal(err)
	}
	cmd := testenv.RunAs(uid, uid, bin, "-test.run=^TestSlotFloodProcess$")
	cmd.Env = append(cmd.Env, fmt.Sprintf("PGWARD_SLOT_FLOOD=%s %d", h.agent.SocketPath(), flood))
	var rep struct{ Opened, Pid int }
	testenv.StartChild(t, testenv.Cgroup{}, cmd, &rep)
	if rep.Opened != flood {
		t.Fatalf("the flooder opened %d connections, want %d", rep.Opened, flood)
	}
	// The default share: max(16, 40/10) = 16 login slots for the flooder.
	const share = 16
	// Every connection past the share is refused: per_uid, or — while a
	// burst of accepts outruns the decisions — max_connections, since
	// connections count against it from accept. Refusals give their slot
	// back at once, so the flood cannot hold more than its share.
	refused := func() (perUID, total float64) {
		perUID = scrapeCounter(t, h, "pgward_connections_refused_total", `reason="per_uid"`)
		return perUID, perUID + scrapeCounter(t, h, "pgward_connections_refused_total", `reason="max_connections"`)
	}
	deadline := time.Now().Add(10 * time.Second)
	for _, total := refused(); total < flood-share && time.Now().Before(deadline); _, total = refused() {
		time.Sleep(50 * time.Millisecond)
	}
	if perUID, total := refused(); total != flood-share || perUID == 0 {
		t.Errorf("pgward_connections_refused_total: per_uid %v, all %v; want all = %d, most per_uid", perUID, total, flood-share)
	}

	// A granted client of another uid (root here) gets in and queries fast:
	// pgward adds under 1 s to the same login straight to PostgreSQL right
	// after (what this machine, -race and other work allow then; an
	// absolute bound measured the machine). Locked out, it would wait for
	// the flooder's 30 s login timeout or be refused.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	loginAndQuery := func(what, dsn string) time.Duration {
		t0 := time.Now()
		c, err := pgx.Connect(ctx, dsn)
		if err != nil {
			t.Fatalf("%s: granted client locked out while uid %d floods: %v", what, uid, err)
		}
		defer c.Close(context.Background())
		var one int
		if err := c.QueryRow(ctx, "select 1").Scan(&one); err != nil || one != 1 {
			t.Fatalf("%s: query: %v", what, err)
		}
		return time.Since(t0)
	}
	via := loginAndQuery("through pgward", h.dsn(testenv.ScramUser, "orders"))
	direct := loginAndQuery("straight to PostgreSQL", h.pg.DSN(testenv.ScramUser, testenv.ScramPassword, testenv.Database))
	t.Logf("granted login and query in %v while uid %d holds %d idle sockets (%v straight to PostgreSQL right after)", via.Round(time.Millisecond), uid, flood, direct.Round(time.Millisecond))
	if via > direct+time.Second {
		t.Errorf("granted login took %v while another uid floods, %v straight to PostgreSQL; want under 1 s more", via, direct)
	}

	// Logged with uid and pid (rate-limited: at least one line).
	logged := false
	sc := bufio.NewScanner(strings.NewReader(h.logs.String()))
	for sc.Scan() {
		var l map[string]any
		if json.Unmarshal(sc.Bytes(), &l) != nil || l["msg"] != "connection refused: no connection slot (53300)" {
			continue
		}
		if l["level"] == "WARN" && l["uid"] == float64(uid) && l["pid"] == float64(rep.Pid) && l["reason"] == "per_uid" {
			logged = true
		}
	}
	if !logged {
		t.Errorf("no WARN line for the refusals naming uid %d and pid %d", uid, rep.Pid)
	}
}

// An audit.path that is a symbolic link is refused at start: following it
// would let whoever can write the directory point the trail anywhere.
func TestAuditPathSymlinkRefused(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "elsewhere.jsonl")
	if err := os.WriteFile(target, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "audit.jsonl")
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	_, err := exporter.OpenAudit(exporter.AuditConfig{Path: link}, nil, nil)
	if err == nil || !strings.Contains(err.Error(), "symbolic link") {
		t.Fatalf("OpenAudit on a symlink: %v; want a refusal naming the symbolic link", err)
	}
	// A dangling link too (it would be created at its target).
	dangling := filepath.Join(dir, "dangling.jsonl")
	if err := os.Symlink(filepath.Join(dir, "nothing-here"), dangling); err != nil {
		t.Fatal(err)
	}
	if _, err := exporter.OpenAudit(exporter.AuditConfig{Path: dangling}, nil, nil); err == nil {
		t.Fatal("OpenAudit on a dangling symlink succeeded")
	}
	if _, err := os.Stat(filepath.Join(dir, "nothing-here")); err == nil {
		t.Fatal("the dangling link's target was created")
	}
}

// A second pgward guarding the same upstream is named in ebpf.exempt by its
// cgroup: its upstream connects are not db.connect.direct, while the same
// program (psql, same uid) in another cgroup still is. Real eBPF programs.
func TestEBPFExemptCgroup(t *testing.T) {
	var other testenv.Cgroup
	h, cg, uid := ebpfHarness(t, false, func(h *harness, c *Config, cg testenv.Cgroup, uid uint32) {
		other = cg.Child(t, "pgward-other.service")
		root, err := bpf.Cgroup2Root()
		if err != nil {
			t.Fatal(err)
		}
		c.EBPF.Exempt = []string{strings.TrimPrefix(other.Path, root)}
	})
	direct := fmt.Sprintf("host=127.0.0.1 port=%d user=%s dbname=%s sslmode=disable", h.pg.Port, testenv.ScramUser, testenv.Database)
	for _, in := range []testenv.Cgroup{other, cg} {
		out, err := psqlIn(t, in, uid, direct, "PGPASSWORD="+testenv.ScramPassword)
		if err != nil || out != testenv.ScramUser {
			t.Fatalf("direct psql in %s: %v %s", in.Path, err, out)
		}
	}
	// The connect from the other cgroup came first; once the second is
	// reported, the first has been read too.
	findEvent(t, h, "db.connect.direct", func(ev map[string]any) bool {
		p, _ := ev["process"].(map[string]any)
		return p != nil && num(p["cgroup_id"]) == cg.ID
	})
	for _, ev := range h.auditEvents(t) {
		if p, _ := ev["process"].(map[string]any); ev["event"] == "db.connect.direct" && p != nil && num(p["cgroup_id"]) == other.ID {
			t.Fatalf("a connect from the exempt cgroup was reported: %v", ev)
		}
	}
	if !strings.Contains(h.logs.String(), "exempt cgroup (ebpf.exempt)") {
		t.Error("no debug line for the exempt connect")
	}
}

// ebpf.exempt takes cgroup paths or service names, never the root cgroup,
// and cannot be combined with enforce (the kernel would refuse the other
// agent's connects).
func TestEBPFExemptConfig(t *testing.T) {
	for _, tc := range []struct {
		exempt  []string
		enforce bool
		want    string
	}{
		{[]string{"/"}, false, "root cgroup"},
		{[]string{"pgward"}, false, "neither a cgroup path"},
		{[]string{"/system.slice/pgward-b.service"}, true, "cannot be combined with ebpf.enforce"},
		{[]string{"/system.slice/pgward-b.service", "pgward-c.service"}, false, ""},
	} {
		c := &Config{EBPF: EBPFConfig{Exempt: tc.exempt, Enforce: tc.enforce}}
		err := c.Validate()
		switch {
		case tc.want == "" && err != nil && strings.Contains(err.Error(), "ebpf.exempt"):
			t.Errorf("%v: %v", tc.exempt, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%v enforce=%v: %v; want %q", tc.exempt, tc.enforce, err, tc.want)
		}
	}
}

// Processes of several uids in one cgroup (a container, a unit) share
// limits.connections_per_cgroup: together they cannot take more login slots,
// and a granted client elsewhere still logs in.
func TestLoginSlotsPerCgroup(t *testing.T) {
	testenv.RequireRoot(t)
	const perCgroup, each = 10, 15
	h := newHarness(t, func(h *harness, c *Config) {
		c.Listen.MaxConnections = 100 // per uid: the default, 16, more than each opens
		c.Listen.LoginTimeout = 30 * time.Second
		c.Limits.ConnectionsPerCgroup = perCgroup
	})
	cg := testenv.NewCgroup(t, "")
	bin, err := testenv.TestBinary()
	if err != nil {
		t.Fatal(err)
	}
	for _, uid := range testenv.UnprivilegedIDs(t, 2) {
		cmd := testenv.RunAs(uid, uid, bin, "-test.run=^TestSlotFloodProcess$")
		cmd.Env = append(cmd.Env, fmt.Sprintf("PGWARD_SLOT_FLOOD=%s %d", h.agent.SocketPath(), each))
		var rep struct{ Opened, Pid int }
		testenv.StartChild(t, cg, cmd, &rep)
		if rep.Opened != each {
			t.Fatalf("uid %d opened %d connections", uid, rep.Opened)
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for scrapeCounter(t, h, "pgward_connections_refused_total", `reason="per_cgroup"`) < 2*each-perCgroup && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if got := scrapeCounter(t, h, "pgward_connections_refused_total", `reason="per_cgroup"`); got != 2*each-perCgroup {
		// Say what else was counted and what pgward logged, so that a
		// failure explains itself.
		t.Errorf("pgward_connections_refused_total{reason=per_cgroup} = %v, want %d (per_uid %v, max_connections %v); refusal log lines:\n%s",
			got, 2*each-perCgroup,
			scrapeCounter(t, h, "pgward_connections_refused_total", `reason="per_uid"`),
			scrapeCounter(t, h, "pgward_connections_refused_total", `reason="max_connections"`),
			grepLines(h.logs.String(), "no connection slot"))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, h.dsn(testenv.ScramUser, "orders"))
	if err != nil {
		t.Fatalf("granted client locked out while a cgroup floods: %v", err)
	}
	c.Close(ctx)
	if !strings.Contains(h.logs.String(), `"cgroup":"`+strings.TrimPrefix(cg.Path, mustCgroup2Root(t))+`"`) {
		t.Error("no WARN line naming the flooding cgroup")
	}
}

func mustCgroup2Root(t *testing.T) string {
	t.Helper()
	root, err := bpf.Cgroup2Root()
	if err != nil {
		t.Fatal(err)
	}
	return root
}

// grepLines returns the lines of s that contain sub.
func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
