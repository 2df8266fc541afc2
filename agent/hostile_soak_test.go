package agent

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgward/pgward/exporter"
	"github.com/pgward/pgward/testenv"
)

// The hostile mix of issue 13: legitimate sessions run the same statements
// twice, first alone (the baseline), then alongside hostile callers:
//
//   - refused-login loopers (a role the caller holds no grant for),
//   - wrong-cancel-key loopers (random keys: dropped, then throttled),
//   - another uid holding idle sockets without a startup packet, as many
//     as it can (root only: it runs as a child of another uid).
//
// It reports and bounds: refusals of legitimate sessions (zero), their p99
// statement latency against the baseline (within 2×, or 20 ms on a loaded
// machine), and the bytes of refusal audit lines (the allowance); it
// reports the test process's peak RSS (VmHWM: agent, clients and runtime,
// and whatever ran before it in the same process).
// Messages announcing huge lengths (issue 13 point 1) are not part of this
// mix yet: that bound belongs to limits.max_message_bytes.
//
// PGWARD_SOAK_SESSIONS (default 10) and PGWARD_SOAK_DURATION (default 3s,
// per phase) size it; `make soak` runs it with 500 sessions.
func TestHostileSoak(t *testing.T) {
	sessions := envInt("PGWARD_SOAK_SESSIONS", 10)
	phase := envDuration("PGWARD_SOAK_DURATION", 3*time.Second)
	raiseNoFile(t, uint64(4*sessions+4096))
	// Each held session and each fresh login holds an upstream connection.
	pg := privatePG(t, testenv.Options{MaxConnections: 2*sessions + 20})
	h := newHarness(t, func(h *harness, c *Config) {
		onPrivatePG(pg)(h, c)
		c.Audit.Parameters = exporter.ParamsRedacted
		c.Listen.MaxConnections = 4*sessions + 200
		// Every legitimate session is root's here and may log in at once:
		// the share is sized for the largest app, as an operator would.
		c.Limits.ConnectionsPerUID = sessions + 50
		info := slog.LevelInfo
		h.logLevel = &info
	})
	ctx := context.Background()

	// Legitimate sessions, held through both phases.
	conns := make([]*pgx.Conn, sessions)
	for i := range conns {
		c, err := pgx.Connect(ctx, h.dsn(testenv.ScramUser, "orders", "application_name=soak"))
		if err != nil {
			t.Fatalf("legitimate session %d: %v", i, err)
		}
		defer c.Close(ctx)
		conns[i] = c
	}
	var legitRefused atomic.Int64
	run := func(d time.Duration) (lat []time.Duration, stmts int) {
		var mu sync.Mutex
		var wg sync.WaitGroup
		end := time.Now().Add(d)
		for i, c := range conns {
			wg.Add(1)
			go func() {
				defer wg.Done()
				var mine []time.Duration
				for j := 0; time.Now().Before(end); j++ {
					t0 := time.Now()
					var n int
					if err := c.QueryRow(ctx, "select $1::int + 1", i*1000+j).Scan(&n); err != nil {
						t.Errorf("legitimate statement: %v", err)
						return
					}
					mine = append(mine, time.Since(t0))
					if j%50 == 0 { // and a fresh login now and then
						nc, err := pgx.Connect(ctx, h.dsn(testenv.ScramUser, "orders"))
						if err != nil {
							legitRefused.Add(1)
							t.Errorf("legitimate login refused: %v", err)
							continue
						}
						nc.Close(ctx)
					}
				}
				mu.Lock()
				lat = append(lat, mine...)
				mu.Unlock()
			}()
		}
		wg.Wait()
		slices.Sort(lat)
		return lat, len(lat)
	}
	p99 := func(l []time.Duration) time.Duration {
		if len(l) == 0 {
			return 0
		}
		return l[len(l)*99/100]
	}

	a0 := auditBytes(t, h)
	baseLat, baseN := run(phase)
	a1 := auditBytes(t, h)
	baseAudit := float64(a1-a0) / phase.Seconds()

	// The hostile phase.
	stop := make(chan struct{})
	var hwg sync.WaitGroup
	var refusedLogins, cancels atomic.Int64
	for range 2 {
		hwg.Add(1)
		go func() {
			defer hwg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				if _, err := refusedStartup(h.agent.SocketPath()); err == nil {
					refusedLogins.Add(1)
				}
				time.Sleep(hostilePace)
			}
		}()
	}
	hwg.Add(1)
	go func() {
		defer hwg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			if err := testenv.SendCancel("unix", h.agent.SocketPath(), rand.Uint32(), rand.Uint32()); err == nil {
				cancels.Add(1)
			}
			time.Sleep(hostilePace)
		}
	}()
	idle := 0
	if testenv.InCI() || isRoot() {
		uid := testenv.UnprivilegedIDs(t, 1)[0]
		bin, err := testenv.TestBinary()
		if err != nil {
			t.Fatal(err)
		}
		cmd := testenv.RunAs(uid, uid, bin, "-test.run=^TestSlotFloodProcess$")
		cmd.Env = append(cmd.Env, fmt.Sprintf("PGWARD_SLOT_FLOOD=%s %d", h.agent.SocketPath(), 2*sessions+100))
		var rep struct{ Opened, Pid int }
		child := testenv.StartChild(t, testenv.Cgroup{}, cmd, &rep)
		defer child.Close()
		idle = rep.Opened
	}
	a2 := auditBytes(t, h)
	hostLat, hostN := run(phase)
	a3 := auditBytes(t, h)
	close(stop)
	hwg.Wait()
	hostAudit := float64(a3-a2) / phase.Seconds()

	peak := peakRSSKB()
	t.Logf("baseline: %d sessions, %d statements in %v, p99 %v, audit %.0f B/s", sessions, baseN, phase, p99(baseLat), baseAudit)
	t.Logf("hostile:  %d statements, p99 %v, audit %.0f B/s (%.0f B/s over baseline); %d refused logins, %d forged cancels, %d idle sockets",
		hostN, p99(hostLat), hostAudit, hostAudit-baseAudit, refusedLogins.Load(), cancels.Load(), idle)
	p99Limit := max(2*p99(baseLat), 20*time.Millisecond)
	t.Logf("legitimate logins refused: %d (bound 0); p99 under the hostile mix %v = %.2f× baseline (bound %v: 2× baseline, or 20 ms)",
		legitRefused.Load(), p99(hostLat), p99(hostLat).Seconds()/max(p99(baseLat).Seconds(), 1e-9), p99Limit)
	t.Logf("peak RSS of the test process (agent, clients, Go runtime; not pgward's alone, and not bounded here): %d MiB", peak/1024)
	t.Logf("slot refusals: per_uid %v, max_connections %v; summarised refusals %v",
		scrapeCounter(t, h, "pgward_connections_refused_total", `reason="per_uid"`),
		scrapeCounter(t, h, "pgward_connections_refused_total", `reason="max_connections"`),
		scrapeCounter(t, h, "pgward_audit_refusals_summarized_total", ""))

	if n := legitRefused.Load(); n != 0 {
		t.Errorf("%d legitimate logins refused", n)
	}
	if p99(hostLat) > p99Limit {
		t.Errorf("p99 under the hostile mix %v; want at most %v (2× baseline %v, or 20 ms)", p99(hostLat), p99Limit, p99(baseLat))
	}
	// The same, from the lines themselves: every refusal event (full or
	// summary) written, including the summaries written at stop.
	h.stop()
	var refusalBytes int
	for _, line := range strings.Split(readFile(t, h.auditPath), "\n") {
		if strings.Contains(line, `"event":"db.refusal.summary"`) ||
			(strings.Contains(line, `"success":false`) && (strings.Contains(line, `"event":"db.session.start"`) || strings.Contains(line, `"event":"db.session.cancel"`))) {
			refusalBytes += len(line) + 1
		}
	}
	// The bound is the audit allowance (docs/audit-events.md): for each of
	// the three kinds of refusal from one caller, 10 full lines at once and
	// 1 a second, plus a summary per 10 s (and one at stop), ~1.6 KB a line.
	// Short runs are dominated by the first 10; 5-minute runs approach
	// 3 × 1.6 KB/s. (Total audit bytes are no measure: the legitimate
	// sessions' statements dominate them and vary with their throughput.)
	bound := 3 * (10 + phase.Seconds() + phase.Seconds()/10 + 2) * 1600
	t.Logf("refusal audit lines: %d bytes, %.0f B/s over the hostile phase (bound %.0f bytes)", refusalBytes, float64(refusalBytes)/phase.Seconds(), bound)
	if float64(refusalBytes) > bound {
		t.Errorf("refusal audit lines: %d bytes in %v; want at most %.0f", refusalBytes, phase, bound)
	}
}

// auditBytes is pgward_audit_bytes_total: every byte appended to the audit
// trail, across rotations (the current file's size shrinks at each one).
func auditBytes(t *testing.T, h *harness) float64 {
	t.Helper()
	return scrapeCounter(t, h, "pgward_audit_bytes_total", "")
}

// hostilePace spaces each hostile looper's attempts (under 1000/s each):
// flat out, the loopers run in this process and take the shared cores from
// the legitimate clients, which measures the machine, not pgward. The
// audit bound does not depend on the rate.
const hostilePace = time.Millisecond

func isRoot() bool { return os.Geteuid() == 0 }

// peakRSSKB is the process's peak resident set (VmHWM).
func peakRSSKB() int {
	b, _ := os.ReadFile("/proc/self/status")
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "VmHWM:") {
			n, _ := strconv.Atoi(strings.Fields(l)[1])
			return n
		}
	}
	return 0
}
