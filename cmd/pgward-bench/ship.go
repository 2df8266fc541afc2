package main

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/pgward/pgward/testenv"
)

// shipAudit is -ship: the pgw-ship row.
var shipAudit bool

// shipRow is a pgward shipping its audit to a real collector, and what
// each of its pgbench runs wrote and shipped.
type shipRow struct {
	target  target
	col     *testenv.Collector
	agent   interface{ stop() }
	metrics string // URL
	w0, s0  float64
	lines   []string
}

type stopFunc func()

func (f stopFunc) stop() { f() }

func startShipRow(dir string, pg *testenv.Postgres) (*shipRow, error) {
	vdir := filepath.Join(dir, "pgw-ship")
	if err := os.Mkdir(vdir, 0o755); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	col, err := testenv.StartCollector(ctx, vdir)
	if err != nil {
		return nil, fmt.Errorf("collector: %w", err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		col.Kill()
		return nil, err
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	cfg := filepath.Join(vdir, "pgward.yaml")
	err = writeAgentConfig(vdir, cfg, pg, "write",
		fmt.Sprintf(`, otlp: { endpoint: %q, insecure: true }`, col.GRPCAddr),
		fmt.Sprintf("metrics: { listen: \"127.0.0.1:%d\" }\n", port))
	if err != nil {
		col.Kill()
		return nil, err
	}
	c, err := startChild("agent", nil, cfg)
	if err != nil {
		col.Kill()
		return nil, err
	}
	if err := waitSocket(filepath.Join(vdir, ".s.PGSQL.5432")); err != nil {
		stopChild(c)
		col.Kill()
		return nil, fmt.Errorf("pgw-ship did not start: %w", err)
	}
	return &shipRow{
		target:  target{name: "pgw-ship", host: vdir, db: "bench", port: 5432, pid: c.Process.Pid, only: "simple,extended,prepared"},
		col:     col,
		agent:   stopFunc(func() { stopChild(c) }),
		metrics: fmt.Sprintf("http://127.0.0.1:%d/metrics", port),
	}, nil
}

func (r *shipRow) stop() {
	r.agent.stop()
	r.col.Kill()
}

// scrape sums every sample of name.
func (r *shipRow) scrape(name string) float64 {
	resp, err := http.Get(r.metrics)
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	var sum float64
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name) {
			continue
		}
		rest := line[len(name):]
		if rest == "" || (rest[0] != ' ' && rest[0] != '{') {
			continue
		}
		f := strings.Fields(line)
		if v, err := strconv.ParseFloat(f[len(f)-1], 64); err == nil {
			sum += v
		}
	}
	return sum
}

func (r *shipRow) before() {
	r.w0, r.s0 = r.scrape("pgward_audit_events_total"), r.scrape("pgward_audit_ship_events_total")
}

// after records the run's rates and the lag when pgbench ended, then waits
// (up to a minute) for the shipper to catch up, so runs do not overlap.
func (r *shipRow) after(workload string, d time.Duration) {
	w, s := r.scrape("pgward_audit_events_total")-r.w0, r.scrape("pgward_audit_ship_events_total")-r.s0
	time.Sleep(1100 * time.Millisecond) // the lag gauges are set about once a second
	lagE, lagS := r.scrape("pgward_audit_ship_lag_events"), r.scrape("pgward_audit_ship_lag_seconds")
	t0 := time.Now()
	for r.scrape("pgward_audit_ship_lag_events") > 0 && time.Since(t0) < time.Minute {
		time.Sleep(100 * time.Millisecond)
	}
	r.lines = append(r.lines, fmt.Sprintf("%-22s written %8.0f ev/s  shipped %8.0f ev/s during the run; 1 s after it: lag %6.0f events (%.1f s), caught up %.1f s later",
		workload, w/d.Seconds(), s/d.Seconds(), lagE, lagS, time.Since(t0).Seconds()))
}

func (r *shipRow) report() {
	fmt.Printf("\naudit shipping (pgw-ship: pgward with audit.otlp to a real OpenTelemetry Collector on this machine, gRPC):\n")
	for _, l := range r.lines {
		fmt.Println(l)
	}
}
