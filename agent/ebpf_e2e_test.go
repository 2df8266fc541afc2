package agent

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pgward/pgward/broker"
	"github.com/pgward/pgward/testenv"
)

// psqlIn runs psql as uid inside cg with a connection string, returning its output.
func psqlIn(t *testing.T, cg testenv.Cgroup, uid uint32, conn string, env ...string) (string, error) {
	t.Helper()
	cmd := testenv.RunAs(uid, uid, "psql", "-XAt", "-c", "select current_user", conn)
	cmd.Env = append(cmd.Env, "PGCONNECT_TIMEOUT=10")
	cmd.Env = append(cmd.Env, env...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cg.Start(cmd); err != nil {
		t.Fatal(err)
	}
	err := cmd.Wait()
	return strings.TrimSpace(out.String()), err
}

func ebpfHarness(t *testing.T, enforce bool, mutate func(h *harness, c *Config, cg testenv.Cgroup, uid uint32)) (*harness, testenv.Cgroup, uint32) {
	t.Helper()
	testenv.RequireRoot(t)
	cg := testenv.NewCgroup(t, "")
	uid := testenv.UnprivilegedIDs(t, 1)[0]
	h := newHarness(t, func(h *harness, c *Config) {
		c.EBPF = EBPFConfig{Enabled: "true", Cgroup: cg.Path, Enforce: enforce}
		c.Principals["cg-client"] = broker.Principal{Match: broker.Selectors{UID: []uint32{uid}, Comm: broker.StringList{"psql"}}}
		c.Grants = append(c.Grants, broker.Grant{Principal: "cg-client", Upstream: "orders", Roles: []string{testenv.ScramUser}})
		if mutate != nil {
			mutate(h, c, cg, uid)
		}
	})
	return h, cg, uid
}

func findEvent(t *testing.T, h *harness, event string, match func(map[string]any) bool) map[string]any {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		for _, ev := range h.auditEvents(t) {
			if ev["event"] == event && match(ev) {
				return ev
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %s event matching", event)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func num(v any) uint64 {
	f, _ := v.(float64)
	return uint64(f)
}

func TestEBPFAttestedSessionAndDirectConnects(t *testing.T) {
	h, cg, uid := ebpfHarness(t, false, nil)
	// Through pgward: the session's audit event carries the kernel's record.
	out, err := psqlIn(t, cg, uid, h.dsn(testenv.ScramUser, "orders"))
	if err != nil || out != testenv.ScramUser {
		t.Fatalf("psql through pgward: %v %s", err, out)
	}
	ev := findEvent(t, h, "db.session.start", func(ev map[string]any) bool {
		p, _ := ev["process"].(map[string]any)
		return p != nil && num(p["uid"]) == uint64(uid)
	})
	p := ev["process"].(map[string]any)
	if p["attested"] != true || p["comm"] != "psql" || num(p["cgroup_id"]) != cg.ID || num(p["start_time"]) == 0 || num(p["ns_pid"]) == 0 {
		t.Fatalf("process not attested by the kernel record: %v", p)
	}
	if ev["principal"] != "cg-client" {
		t.Fatalf("principal %v", ev["principal"])
	}

	// Around pgward, over TCP and over the upstream's socket: reported, not blocked.
	for _, direct := range []string{
		fmt.Sprintf("host=127.0.0.1 port=%d user=%s dbname=%s sslmode=disable", h.pg.Port, testenv.ScramUser, testenv.Database),
		h.pg.DSN(testenv.ScramUser, "", testenv.Database),
	} {
		out, err := psqlIn(t, cg, uid, direct, "PGPASSWORD="+testenv.ScramPassword)
		if err != nil || out != testenv.ScramUser {
			t.Fatalf("direct psql (not enforced) %q: %v %s", direct, err, out)
		}
	}
	tcp := findEvent(t, h, "db.connect.direct", func(ev map[string]any) bool {
		return ev["db_uri"] == h.pg.TCPAddr()
	})
	unixEv := findEvent(t, h, "db.connect.direct", func(ev map[string]any) bool {
		return ev["db_uri"] == h.pg.SocketPath()
	})
	for _, ev := range []map[string]any{tcp, unixEv} {
		p := ev["process"].(map[string]any)
		if num(p["uid"]) != uint64(uid) || p["comm"] != "psql" || ev["blocked"] != false || ev["db_service"] == "" {
			t.Fatalf("direct connect event: %v", ev)
		}
	}
	if !strings.Contains(h.logs.String(), "direct connect to a guarded database endpoint") {
		t.Fatal("no WARN line for the direct connect")
	}
	// pgward's own upstream dials are not direct connects.
	for _, ev := range h.auditEvents(t) {
		if ev["event"] == "db.connect.direct" {
			if p := ev["process"].(map[string]any); num(p["pid"]) == uint64(os.Getpid()) {
				t.Fatalf("pgward's own dial reported: %v", ev)
			}
		}
	}
	if n := scrapeCounter(t, h, `pgward_direct_connects_total`, `blocked="false"`); n < 2 {
		t.Fatalf("pgward_direct_connects_total{blocked=false} = %v", n)
	}
}

func TestEBPFEnforcement(t *testing.T) {
	h, cg, uid := ebpfHarness(t, true, nil)
	_, err := psqlIn(t, cg, uid, fmt.Sprintf("host=127.0.0.1 port=%d user=%s dbname=%s sslmode=disable", h.pg.Port, testenv.ScramUser, testenv.Database), "PGPASSWORD="+testenv.ScramPassword)
	if err == nil {
		t.Fatal("direct TCP connect succeeded under enforcement")
	}
	_, err = psqlIn(t, cg, uid, h.pg.DSN(testenv.ScramUser, "", testenv.Database), "PGPASSWORD="+testenv.ScramPassword)
	if err == nil {
		t.Fatal("direct Unix connect succeeded under enforcement")
	}
	findEvent(t, h, "db.connect.direct", func(ev map[string]any) bool { return ev["blocked"] == true && ev["db_uri"] == h.pg.TCPAddr() })
	findEvent(t, h, "db.connect.direct", func(ev map[string]any) bool { return ev["blocked"] == true && ev["db_uri"] == h.pg.SocketPath() })
	// The pgward path still works.
	out, err := psqlIn(t, cg, uid, h.dsn(testenv.ScramUser, "orders"))
	if err != nil || out != testenv.ScramUser {
		t.Fatalf("psql through pgward under enforcement: %v %s", err, out)
	}
	if n := scrapeCounter(t, h, `pgward_direct_connects_total`, `blocked="true"`); n < 2 {
		t.Fatalf("blocked direct connects counted %v", n)
	}
}

func TestEBPFTCPListener(t *testing.T) {
	h, cg, uid := ebpfHarness(t, false, func(_ *harness, c *Config, _ testenv.Cgroup, _ uint32) {
		c.Listen.TCP = "127.0.0.1:0"
	})
	port := h.agent.TCPAddr().(interface{ String() string }).String()
	_, p, _ := strings.Cut(port, ":")
	conn := fmt.Sprintf("host=127.0.0.1 port=%s user=%s dbname=orders sslmode=disable", p, testenv.ScramUser)
	out, err := psqlIn(t, cg, uid, conn)
	if err != nil || out != testenv.ScramUser {
		t.Fatalf("psql over the TCP listener: %v %s", err, out)
	}
	ev := findEvent(t, h, "db.session.start", func(ev map[string]any) bool {
		p, _ := ev["process"].(map[string]any)
		return p != nil && num(p["uid"]) == uint64(uid) && ev["success"] == true
	})
	if p := ev["process"].(map[string]any); p["attested"] != true || num(p["cgroup_id"]) != cg.ID {
		t.Fatalf("TCP session identity: %v", p)
	}
	// A client outside the watched cgroup has no record: refused.
	e := connectErr(t, conn)
	if e.Code != broker.CodeInvalidAuthorization {
		t.Fatalf("unattested TCP client: %s %s", e.Code, e.Message)
	}
}

func TestEBPFRequireRecord(t *testing.T) {
	h, cg, uid := ebpfHarness(t, false, func(_ *harness, c *Config, _ testenv.Cgroup, _ uint32) {
		c.Identity.RequireEBPF = true
	})
	// In the watched cgroup: attested, accepted.
	if out, err := psqlIn(t, cg, uid, h.dsn(testenv.ScramUser, "orders")); err != nil || out != testenv.ScramUser {
		t.Fatalf("attested client refused: %v %s", err, out)
	}
	// Outside it (this test process): no record, refused as an identity failure.
	e := connectErr(t, h.dsn(testenv.ScramUser, "orders"))
	if e.Code != broker.CodeInvalidAuthorization || !strings.Contains(e.Message, "verify the identity") {
		t.Fatalf("unattested client: %s %q", e.Code, e.Message)
	}
	// Tracker stopped: even the cgroup's clients are refused.
	h.agent.ebpf.tracker.Close()
	if out, err := psqlIn(t, cg, uid, h.dsn(testenv.ScramUser, "orders")); err == nil {
		t.Fatalf("client accepted with the tracker stopped: %s", out)
	}
	if n := scrapeCounter(t, h, "pgward_identity_verification_failures_total", ""); n < 2 {
		t.Fatalf("identity verification failures %v", n)
	}
}

// scrapeCounter reads a counter (summing series whose labels contain sel)
// from the agent's /metrics.
func scrapeCounter(t *testing.T, h *harness, name, sel string) float64 {
	t.Helper()
	out, err := exec.Command("curl", "-sf", "http://"+h.agent.MetricsAddr().String()+"/metrics").Output()
	if err != nil {
		// curl may be missing: use Go's client.
		out = httpGet(t, "http://"+h.agent.MetricsAddr().String()+"/metrics")
	}
	var sum float64
	for _, line := range strings.Split(string(out), "\n") {
		if !strings.HasPrefix(line, name) || strings.HasPrefix(line, "#") {
			continue
		}
		rest := strings.TrimPrefix(line, name)
		if rest != "" && rest[0] != ' ' && rest[0] != '{' {
			continue
		}
		if sel != "" && !strings.Contains(rest, sel) {
			continue
		}
		f := strings.Fields(rest)
		v, _ := strconv.ParseFloat(f[len(f)-1], 64)
		sum += v
	}
	return sum
}
