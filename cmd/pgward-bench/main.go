// Command pgward-bench runs pgbench against a private Postgres directly and
// through an in-process pgward, interleaved in the same run, and prints the
// figures side by side. It is what `make bench` runs.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"syscall"
	"time"

	"github.com/pgward/pgward/agent"
	"github.com/pgward/pgward/broker"
	"github.com/pgward/pgward/broker/secrets"
	"github.com/pgward/pgward/exporter"
	"github.com/pgward/pgward/testenv"
)

func main() {
	duration := flag.Duration("duration", 10*time.Second, "length of each pgbench run")
	rounds := flag.Int("rounds", 3, "interleaved rounds per configuration (the median is reported)")
	clients := flag.Int("clients", 8, "pgbench clients")
	scale := flag.Int("scale", 10, "pgbench scale")
	flag.Parse()
	if err := run(*duration, *rounds, *clients, *scale); err != nil {
		fmt.Fprintln(os.Stderr, "pgward-bench:", err)
		os.Exit(1)
	}
}

type result struct{ tps, latencyMS float64 }

func run(duration time.Duration, rounds, clients, scale int) error {
	ctx := context.Background()
	if _, err := exec.LookPath("pgbench"); err != nil {
		return fmt.Errorf("pgbench not found: apt-get install -y postgresql-contrib")
	}
	fmt.Fprintln(os.Stderr, "starting a private PostgreSQL…")
	pg, err := testenv.StartPostgres(ctx, testenv.Options{MaxConnections: 100})
	if err != nil {
		return err
	}
	defer pg.Stop()
	fmt.Fprintf(os.Stderr, "pgbench -i -s %d…\n", scale)
	initCmd := exec.Command("pgbench", "-i", "-q", "-s", strconv.Itoa(scale), "-h", pg.SocketDir, "-p", strconv.Itoa(pg.Port), "-U", testenv.ScramUser, testenv.Database)
	initCmd.Env = append(os.Environ(), "PGPASSWORD="+testenv.ScramPassword)
	if out, err := initCmd.CombinedOutput(); err != nil {
		return fmt.Errorf("pgbench -i: %v\n%s", err, out)
	}

	dir, err := os.MkdirTemp("", "pgwb-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	secretsPath := filepath.Join(dir, "secrets.yaml")
	if err := os.WriteFile(secretsPath, []byte(fmt.Sprintf("bench:\n  %s: { password: %s }\n", testenv.ScramUser, testenv.ScramPassword)), 0o600); err != nil {
		return err
	}
	cfg := &agent.Config{
		Config: broker.Config{
			Listen:     broker.ListenConfig{UnixDir: dir, Port: 5432},
			Upstreams:  map[string]broker.UpstreamConfig{"bench": {Address: pg.SocketPath(), Database: testenv.Database}},
			Principals: map[string]broker.Principal{"bench": {Match: broker.Selectors{UID: []uint32{uint32(os.Getuid())}}}},
			Grants:     []broker.Grant{{Principal: "bench", Upstream: "bench", Roles: []string{testenv.ScramUser}}},
		},
		Secrets: agent.SecretsConfig{Backend: "file", File: secrets.FileConfig{Path: secretsPath}},
		Audit:   exporter.AuditConfig{Path: filepath.Join(dir, "audit.jsonl"), Durability: exporter.DurabilityWrite, Parameters: exporter.ParamsFull, MaxSize: 256 << 20, MaxFiles: 2},
		EBPF:    agent.EBPFConfig{Enabled: "false"},
	}
	a, err := agent.New(ctx, agent.Options{Config: cfg, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		return err
	}
	actx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- a.Run(actx) }()
	defer func() { stop(); <-done }()

	type target struct {
		name, host, db string
		port           int
		env            []string
	}
	targets := []target{
		{"direct", pg.SocketDir, testenv.Database, pg.Port, []string{"PGPASSWORD=" + testenv.ScramPassword}},
		{"pgward", dir, "bench", 5432, nil},
	}
	modes := []struct{ name, arg string }{{"select-only simple", "simple"}, {"select-only extended", "extended"}, {"select-only prepared", "prepared"}}
	results := map[string][]result{}
	var cpu time.Duration
	var pgwardQueries float64
	for r := 0; r < rounds; r++ {
		for _, m := range modes {
			for _, t := range targets {
				before := cpuTime()
				res, err := pgbench(t.host, t.port, t.db, t.env, m.arg, clients, duration)
				if err != nil {
					return fmt.Errorf("%s %s: %w", m.name, t.name, err)
				}
				if t.name == "pgward" {
					cpu += cpuTime() - before
					pgwardQueries += res.tps * duration.Seconds()
				}
				key := m.name + "|" + t.name
				results[key] = append(results[key], res)
				fmt.Fprintf(os.Stderr, "round %d/%d %-22s %-7s %10.0f tps\n", r+1, rounds, m.name, t.name, res.tps)
			}
		}
	}
	fmt.Printf("\npgbench -S, %d clients, %s × %d interleaved rounds (median), scale %d, on %d cores\n\n", clients, duration, rounds, scale, numCPU())
	fmt.Printf("%-22s %-8s %12s %12s %10s\n", "workload", "path", "tps", "latency ms", "vs direct")
	for _, m := range modes {
		direct := median(results[m.name+"|direct"])
		for _, t := range targets {
			med := median(results[m.name+"|"+t.name])
			fmt.Printf("%-22s %-8s %12.0f %12.3f %9.2fx\n", m.name, t.name, med.tps, med.latencyMS, med.tps/direct.tps)
		}
	}
	if pgwardQueries > 0 {
		fmt.Printf("\npgward CPU: %.2f s per 100k queries (in-process, audit write, parameters full)\n", cpu.Seconds()/pgwardQueries*100000)
	}
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	fmt.Printf("max RSS of the bench process (pgward inside): %d MiB\n", ru.Maxrss/1024)
	return nil
}

var (
	tpsRe = regexp.MustCompile(`tps = ([0-9.]+) \(without initial`)
	latRe = regexp.MustCompile(`latency average = ([0-9.]+) ms`)
)

func pgbench(host string, port int, db string, env []string, mode string, clients int, d time.Duration) (result, error) {
	cmd := exec.Command("pgbench", "-n", "-S", "-M", mode, "-c", strconv.Itoa(clients), "-j", "2",
		"-T", strconv.Itoa(int(d.Seconds())), "-h", host, "-p", strconv.Itoa(port), "-U", testenv.ScramUser, db)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return result{}, fmt.Errorf("%v\n%s", err, out)
	}
	m := tpsRe.FindSubmatch(out)
	l := latRe.FindSubmatch(out)
	if m == nil || l == nil {
		return result{}, fmt.Errorf("unexpected pgbench output:\n%s", out)
	}
	tps, _ := strconv.ParseFloat(string(m[1]), 64)
	lat, _ := strconv.ParseFloat(string(l[1]), 64)
	return result{tps, lat}, nil
}

func median(rs []result) result {
	s := append([]result(nil), rs...)
	sort.Slice(s, func(i, j int) bool { return s[i].tps < s[j].tps })
	return s[len(s)/2]
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func numCPU() int {
	n := 0
	b, _ := os.ReadFile("/proc/cpuinfo")
	for _, l := range regexp.MustCompile(`(?m)^processor`).FindAll(b, -1) {
		_ = l
		n++
	}
	return n
}
