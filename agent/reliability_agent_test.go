package agent

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pgward/pgward/exporter"
	"github.com/pgward/pgward/testenv"
)

// What stays of the reliability tests in agent: the /proc parser's fuzz
// target, forged cancel keys (counted in the exporter's metrics), and the
// helpers the agent's load tests share. The broker's reliability tests
// are in broker/reliability_test.go.

// FuzzStatStartTime: /proc/<pid>/stat as the kernel writes it, with any
// comm (spaces, parentheses, newlines) and any other fields, gives back the
// start time; arbitrary bytes never panic.
func FuzzStatStartTime(f *testing.F) {
	f.Add([]byte("psql"), uint64(123456), []byte("1234 (psql) S 1 1234 1234 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 98765 0 0\n"))
	f.Add([]byte("a) b (c"), uint64(1), []byte("1 (x) R"))
	f.Add([]byte(") 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9"), uint64(1<<63), []byte(")"))
	f.Add([]byte("tab\there\nnl"), uint64(0), []byte("9 (a) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 18446744073709551616"))
	f.Fuzz(func(t *testing.T, comm []byte, start uint64, raw []byte) {
		_, _ = StatStartTime(raw)
		if len(comm) > 64 || strings.ContainsRune(string(comm), 0) {
			return
		}
		// Fields 3..21, then starttime (22), then more.
		fields := []string{"S", "1", "2", "3", "0", "-1", "4194560", "100", "0", "0", "0", "0", "0", "0", "0", "20", "0", "1", "0"}
		line := fmt.Sprintf("4242 (%s) %s %d 12345 67890\n", comm, strings.Join(fields, " "), start)
		got, ok := StatStartTime([]byte(line))
		if !ok || got != start {
			t.Fatalf("comm %q start %d: got %d %v from %q", comm, start, got, ok, line)
		}
		// A truncated line (fields cut before starttime) is refused.
		cut := fmt.Sprintf("4242 (%s) %s", comm, strings.Join(fields[:18], " "))
		if v, ok := StatStartTime([]byte(cut)); ok {
			t.Fatalf("truncated stat %q parsed as %d", cut, v)
		}
	})
}

// waitUpstreamGone waits until no upstream backend has application_name app.
func waitUpstreamGone(t *testing.T, pg *testenv.Postgres, app string) {
	t.Helper()
	pg.WaitBackendsGone(t, app)
}

func waitNoSessions(t *testing.T, h *harness) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for h.agent.Broker().ActiveSessions() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d sessions still active", h.agent.Broker().ActiveSessions())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func raiseNoFile(t testing.TB, n uint64) {
	t.Helper()
	testenv.RaiseNoFile(t, n)
}

// 100k forged cancel keys (the right backend pid, random secrets) cancel
// nothing: the running query completes; wrong keys are logged at WARN and,
// past the per-uid budget, dropped unread.
func TestForgedCancelKeysCancelNothing(t *testing.T) {
	const n = 100000
	h := newHarness(t, func(_ *harness, c *Config) {
		c.Audit.Durability = exporter.DurabilityAsync // the test is about cancels, not the audit disk
	})
	c := h.connect(t, testenv.ScramUser, "orders")
	res := make(chan error, 1)
	go func() {
		_, err := c.Exec(context.Background(), "select pg_sleep(4)")
		res <- err
	}()
	time.Sleep(200 * time.Millisecond)
	pid := c.PgConn().PID()
	var wg sync.WaitGroup
	var sent atomic.Int64
	start := time.Now()
	for w := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 42))
			for i := w; i < n; i += 16 {
				if err := testenv.SendCancel("unix", h.agent.SocketPath(), pid, rng.Uint32()); err != nil {
					t.Error(err)
					return
				}
				sent.Add(1)
			}
		}()
	}
	wg.Wait()
	t.Logf("%d forged cancel requests in %v", sent.Load(), time.Since(start))
	if err := <-res; err != nil {
		t.Fatalf("the query was cancelled by a forged key: %v", err)
	}
	logs := h.logs.String()
	if !strings.Contains(logs, "cancel request with an unknown key") || !strings.Contains(logs, "too many wrong cancel keys") {
		t.Fatal("forged cancels not logged at WARN")
	}
	deadline := time.Now().Add(10 * time.Second)
	for scrapeCounter(t, h, "pgward_cancel_requests_total", `outcome="rejected"`) < n {
		if time.Now().After(deadline) {
			t.Fatalf("rejected cancels counted: %v, want %d", scrapeCounter(t, h, "pgward_cancel_requests_total", `outcome="rejected"`), n)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
