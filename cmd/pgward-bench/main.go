// Command pgward-bench runs pgbench against a private Postgres directly,
// through pgward, through a minimal byte relay and through PgBouncer
// (session mode, when installed), interleaved in the same run, and prints
// the medians side by side. It is what `make bench` runs.
//
// pgward and the relay each run in a process of their own (this binary,
// re-executed), so each pays the same process boundary and the CPU and RSS
// figures are theirs alone. pgward runs with audit durability "write" and
// parameters "full".
//
// With -baseline, a pgward binary built from another commit (make bench
// BASELINE=<rev>) runs as one more row, pgw-base, in the same interleaved
// rounds, and the bench ends with the ratios of this build to it.
package main

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"os/user"
	"path/filepath"
	"regexp"
	"runtime"
	"runtime/pprof"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/pgward/pgward/agent"
	"github.com/pgward/pgward/broker"
	"github.com/pgward/pgward/broker/secrets"
	"github.com/pgward/pgward/exporter"
	"github.com/pgward/pgward/testenv"
)

func main() {
	switch os.Getenv("PGWARD_BENCH_ROLE") {
	case "agent":
		os.Exit(runAgent(os.Args[1]))
	case "noaudit":
		os.Exit(runNoAudit(os.Args[1]))
	case "relay":
		os.Exit(runRelay(os.Args[1], os.Args[2]))
	case "relay-loop":
		os.Exit(runLoopRelay(os.Args[1], os.Args[2]))
	}
	duration := flag.Duration("duration", 7*time.Second, "length of each pgbench run")
	rounds := flag.Int("rounds", 3, "interleaved rounds per configuration (the median is reported)")
	clients := flag.Int("clients", 8, "pgbench clients")
	scale := flag.Int("scale", 10, "pgbench scale")
	only := flag.String("workloads", "", "comma-separated subset of workloads: simple,extended,prepared,tpcb,connect")
	cpuprofile := flag.String("cpuprofile", "", "write a CPU profile of the pgward process to this file")
	decompose := flag.Bool("decompose", true, "also run select-only through pgward with audit durability async (pgw-async) and without statement audit lines (pgw-noaudit), to show what the audit costs")
	flag.BoolVar(&shipAudit, "ship", false, "also run select-only through a pgward that ships its audit (audit.otlp) to a real OpenTelemetry Collector (bin/otelcol), the pgw-ship row, and report events written vs shipped and the lag")
	flag.StringVar(&pgwardBin, "pgward", "", "run the pgward and pgw+reuse rows with this pgward binary (`pgward agent --config`) instead of this program re-executed (make bench BASELINE=… passes bin/pgward, so both builds run the same way)")
	flag.StringVar(&baselineBin, "baseline", "", "a pgward binary built from another commit: runs as the pgw-base (and base+reuse) rows in the same interleaved rounds, and the ratios of pgward to it are printed at the end (make bench BASELINE=<git rev>)")
	flag.BoolVar(&baselineLoop, "baseline-event-loop", false, "run the -baseline build with listen.event_loop on, and compare pgw-loop with it")
	flag.BoolVar(&eventLoopRow, "event-loop", true, "also run the pgw-loop row: pgward as the pgward row with listen.event_loop on (its sessions relayed on one epoll event loop)")
	flag.IntVar(&loopNice, "loop-nice", 0, "run the pgw-loop row with listen.event_loop_nice at this value (-20..19; a negative one needs root or CAP_SYS_NICE)")
	flag.BoolVar(&loopNetpollRow, "loop-netpoll", false, "also run the loop-netpoll row: relay-loop with every socket also registered with the Go runtime's netpoller, as a net.Conn's is (what leaving them there would cost an event loop)")
	flag.BoolVar(&loopRelayRow, "relay-loop", true, "also run the relay-loop row: the minimal relay driven by one epoll event loop on one thread, as PgBouncer is (the ceiling of an event-loop relay in Go on this machine)")
	flag.StringVar(&sweepClients, "sweep", "1,64", "client counts to run besides -clients, for the -sweep-workloads (comma-separated; empty for none)")
	flag.StringVar(&sweepWorkloads, "sweep-workloads", "simple", "workloads run at the -sweep client counts")
	flag.StringVar(&sharedBuffers, "shared-buffers", "256MB", "shared_buffers of the bench's PostgreSQL server (kB, MB or GB); the default holds the tables and indexes of scale 10 (about 150 MiB), which are read into it before the first round, as a production server holds its working set; \"\" for testenv's 32MB, where select-only statements copy pages in from the kernel's page cache")
	flag.StringVar(&auditDir, "audit-dir", "", "directory for pgward's audit files (default: the bench's temporary directory, under $TMPDIR); put it on the file system production would use")
	flag.Parse()
	if sharedBuffers != "" && !sharedBuffersRE.MatchString(sharedBuffers) {
		fmt.Fprintf(os.Stderr, "pgward-bench: -shared-buffers %q: want a size such as 256MB (kB, MB or GB), or \"\" for testenv's 32MB\n", sharedBuffers)
		os.Exit(2)
	}
	if err := run(*duration, *rounds, *clients, *scale, *only, *cpuprofile, *decompose); err != nil {
		fmt.Fprintln(os.Stderr, "pgward-bench:", err)
		os.Exit(1)
	}
}

type result struct{ tps, latencyMS float64 }

type workload struct {
	name, key string
	args      []string
	stmts     float64 // statements per transaction
}

var workloads = []workload{
	{"select-only simple", "simple", []string{"-S", "-M", "simple"}, 1},
	{"select-only extended", "extended", []string{"-S", "-M", "extended"}, 1},
	{"select-only prepared", "prepared", []string{"-S", "-M", "prepared"}, 1},
	{"tpc-b-like", "tpcb", []string{"-M", "prepared"}, 7},
	{"connect/tx (-C -S)", "connect", []string{"-S", "-C", "-M", "simple"}, 1},
}

type target struct {
	name, host, db string
	port           int
	env            []string
	pid            int    // the process whose CPU is counted, 0 for none
	only           string // run only for these workload keys (comma-separated), when set
}

func (t target) runs(w workload) bool {
	return t.only == "" || strings.Contains(","+t.only+",", ","+w.key+",")
}

func run(duration time.Duration, rounds, clients, scale int, only, cpuprofile string, decompose bool) error {
	// SIGINT or SIGTERM stops the pgbench running and returns, so that the
	// deferred clean-ups stop the children and the server and remove the
	// temporary files and the server's cgroup.
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if _, err := exec.LookPath("pgbench"); err != nil {
		return fmt.Errorf("pgbench not found: apt-get install -y postgresql-contrib")
	}
	fmt.Fprintln(os.Stderr, "starting a private PostgreSQL…")
	opts := testenv.Options{MaxConnections: 200}
	if sharedBuffers != "" {
		opts.ExtraConf = append(opts.ExtraConf, "shared_buffers = "+sharedBuffers)
	}
	pg, err := testenv.StartPostgres(ctx, opts)
	if err != nil {
		return err
	}
	defer pg.Stop()
	server, err := newServerCPU(pg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "no server µs/stmt column:", err)
	} else {
		defer server.close()
	}
	fmt.Fprintf(os.Stderr, "pgbench -i -s %d…\n", scale)
	initCmd := exec.CommandContext(ctx, "pgbench", "-i", "-q", "-s", strconv.Itoa(scale), "-h", pg.SocketDir, "-p", strconv.Itoa(pg.Port), "-U", testenv.ScramUser, testenv.Database)
	initCmd.Env = append(os.Environ(), "PGPASSWORD="+testenv.ScramPassword)
	if out, err := initCmd.CombinedOutput(); ctx.Err() != nil {
		return errInterrupted
	} else if err != nil {
		return fmt.Errorf("pgbench -i: %v\n%s", err, out)
	}
	if sharedBuffers != "" {
		if err := prewarm(ctx, pg); err != nil {
			return err
		}
	}

	dir, err := os.MkdirTemp("", "pgwb-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	benchDir = dir
	if auditDir != "" {
		defer func() {
			old, _ := filepath.Glob(filepath.Join(auditDir, filepath.Base(dir)+"-*audit.jsonl*"))
			for _, f := range old {
				os.Remove(f)
			}
		}()
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		return err
	}
	pw := []string{"PGPASSWORD=" + testenv.ScramPassword}
	targets := []target{{name: "direct", host: pg.SocketDir, db: testenv.Database, port: pg.Port, env: pw}}

	// The minimal relay: bytes both ways, no parsing.
	relayDir := filepath.Join(dir, "relay")
	_ = os.Mkdir(relayDir, 0o755)
	var relayEnv []string
	if cpuprofile != "" {
		abs, _ := filepath.Abs(cpuprofile + ".relay")
		relayEnv = append(relayEnv, "PGWARD_BENCH_CPUPROFILE="+abs)
	}
	relay, err := startChild("relay", relayEnv, filepath.Join(relayDir, ".s.PGSQL.5432"), pg.SocketPath())
	if err != nil {
		return err
	}
	defer stopChild(relay)
	targets = append(targets, target{name: "relay", host: relayDir, db: testenv.Database, port: 5432, env: pw, pid: relay.Process.Pid})
	if loopRelayRow {
		loopDir := filepath.Join(dir, "relay-loop")
		_ = os.Mkdir(loopDir, 0o755)
		loop, err := startChild("relay-loop", nil, filepath.Join(loopDir, ".s.PGSQL.5432"), pg.SocketPath())
		if err != nil {
			return err
		}
		defer stopChild(loop)
		targets = append(targets, target{name: "relay-loop", host: loopDir, db: testenv.Database, port: 5432, env: pw, pid: loop.Process.Pid})
		if loopNetpollRow {
			npDir := filepath.Join(dir, "loop-netpoll")
			_ = os.Mkdir(npDir, 0o755)
			np, err := startChild("relay-loop", []string{"PGWARD_BENCH_LOOP_NETPOLL=1"}, filepath.Join(npDir, ".s.PGSQL.5432"), pg.SocketPath())
			if err != nil {
				return err
			}
			defer stopChild(np)
			targets = append(targets, target{name: "loop-netpoll", host: npDir, db: testenv.Database, port: 5432, env: pw, pid: np.Process.Pid})
		}
	}

	// pgward in its own process.
	cfgPath := filepath.Join(dir, "pgward.yaml")
	if err := writeAgentConfig(dir, cfgPath, pg, "write", "", ""); err != nil {
		return err
	}
	if pgwardBin != "" && cpuprofile != "" {
		fmt.Fprintln(os.Stderr, "-cpuprofile: no profile of the pgward rows with -pgward (only of the relay)")
	}
	pgw, err := startPgward("pgward", dir, cfgPath, cpuprofile, "")
	if err != nil {
		return err
	}
	defer stopChild(pgw)
	targets = append(targets, target{name: "pgward", host: dir, db: "bench", port: 5432, pid: pgw.Process.Pid})
	if eventLoopRow {
		// The same configuration with listen.event_loop: the sessions
		// relayed on one epoll loop (broker/eventloop.go).
		ldir, lcfg, err := agentDir(dir, "pgw-loop", pg, true, loopNice)
		if err != nil {
			return err
		}
		lp, err := startPgward("pgw-loop", ldir, lcfg, cpuprofile, ".loop")
		if err != nil {
			return err
		}
		defer stopChild(lp)
		targets = append(targets, target{name: "pgw-loop", host: ldir, db: "bench", port: 5432, pid: lp.Process.Pid})
	}
	// The same pgward process, upstream connection reuse on (connect workload only).
	targets = append(targets, target{name: "pgw+reuse", host: dir, db: "benchreuse", port: 5432, pid: pgw.Process.Pid, only: "connect"})
	if baselineBin != "" {
		// The other build, same configuration (with -baseline-event-loop,
		// pgw-loop's), its rows right after ours.
		bdir, bcfg, err := agentDir(dir, "pgw-base", pg, baselineLoop, 0)
		if err != nil {
			return err
		}
		base, err := startBinary(baselineBin, bdir, bcfg)
		if err != nil {
			return err
		}
		defer stopChild(base)
		if err := waitSocket(filepath.Join(bdir, ".s.PGSQL.5432")); err != nil {
			return fmt.Errorf("the baseline %s did not start (see %s): %w", baselineBin, filepath.Join(bdir, "pgward.log"), err)
		}
		targets = append(targets,
			target{name: "pgw-base", host: bdir, db: "bench", port: 5432, pid: base.Process.Pid},
			target{name: "base+reuse", host: bdir, db: "benchreuse", port: 5432, pid: base.Process.Pid, only: "connect"})
	}
	if decompose {
		// What the statement audit costs, select-only only: pgward with
		// audit durability "async" (the same work, the write(2) off the
		// statement's path), and pgward with no statement audit lines at
		// all (sessions still audited; metrics and logs as usual).
		for _, v := range []struct {
			name, durability, role string
			loop                   bool
		}{
			{"pgw-async", "async", "agent", false},
			{"pgw-noaudit", "write", "noaudit", false},
			{"pgw-1cpu", "write", "agent", false},
			// pgw-loop's audit cost: the loop without statement audit lines.
			{"loop-noaudit", "write", "noaudit", true},
		} {
			if v.loop && !eventLoopRow {
				continue
			}
			vdir := filepath.Join(dir, v.name)
			if err := os.Mkdir(vdir, 0o755); err != nil {
				return err
			}
			vcfg := filepath.Join(vdir, "pgward.yaml")
			if err := writeAgentConfig(vdir, vcfg, pg, v.durability, "", ""); err != nil {
				return err
			}
			if v.loop {
				if err := withEventLoop(vcfg, loopNice); err != nil {
					return err
				}
			}
			var env []string
			if v.name == "pgw-1cpu" {
				// The Go runtime on one P: no idle P to wake (futex) and
				// no spinning threads for each goroutine made runnable.
				env = []string{"GOMAXPROCS=1"}
			}
			c, err := startChild(v.role, env, vcfg)
			if err != nil {
				return err
			}
			defer stopChild(c)
			if err := waitSocket(filepath.Join(vdir, ".s.PGSQL.5432")); err != nil {
				return fmt.Errorf("%s did not start: %w", v.name, err)
			}
			targets = append(targets, target{name: v.name, host: vdir, db: "bench", port: 5432, pid: c.Process.Pid, only: "simple,extended,prepared"})
		}
	}

	var ship *shipRow
	if shipAudit {
		if ship, err = startShipRow(dir, pg); err != nil {
			return err
		}
		defer ship.stop()
		targets = append(targets, ship.target)
	}

	// PgBouncer, session mode, SCRAM to the client and the server.
	if bouncer, bdir, err := startPgBouncer(dir, pg); err != nil {
		fmt.Fprintln(os.Stderr, "PgBouncer skipped:", err)
	} else {
		defer stopChild(bouncer)
		targets = append(targets, target{name: "pgbouncer", host: bdir, db: "bench", port: 6432, env: pw, pid: bouncer.Process.Pid})
	}

	var wls []workload
	for _, w := range workloads {
		if only == "" || strings.Contains(","+only+",", ","+w.key+",") {
			wls = append(wls, w)
		}
	}
	cases, err := benchCases(wls, clients)
	if err != nil {
		return err
	}
	results := map[string][]result{}
	cpu := map[string]time.Duration{}
	ucpu := map[string]time.Duration{}   // the user-mode part of cpu
	rqwait := map[string]time.Duration{} // runnable, waiting for a CPU
	switches := map[string]int64{}
	srvcpu := map[string]time.Duration{} // the server's CPU (serverCPU)
	stmts := map[string]float64{}
	for r := 0; r < rounds; r++ {
		for _, w := range cases {
			for _, t := range targets {
				if !t.runs(w.workload) || (w.clients != clients && !sweepTarget(t.name)) {
					continue
				}
				beforeU, beforeS := procTimes(t.pid) // one read: user and total agree
				beforeCS, beforeRQ := procSwitches(t.pid), procRunDelay(t.pid)
				beforeSrv := server.at()
				if ship != nil && t.name == ship.target.name {
					ship.before()
				}
				res, err := pgbench(ctx, t, w.workload, w.clients, duration)
				if ctx.Err() != nil {
					return errInterrupted
				}
				if err != nil {
					return fmt.Errorf("%s %s: %w", w.label, t.name, err)
				}
				if ship != nil && t.name == ship.target.name {
					ship.after(w.name, duration)
				}
				key := w.label + "|" + t.name
				afterU, afterS := procTimes(t.pid)
				srvcpu[key] += server.at() - beforeSrv
				cpu[key] += afterU + afterS - beforeU - beforeS
				ucpu[key] += afterU - beforeU
				rqwait[key] += procRunDelay(t.pid) - beforeRQ
				switches[key] += procSwitches(t.pid) - beforeCS
				stmts[key] += res.tps * duration.Seconds() * w.stmts
				results[key] = append(results[key], res)
				fmt.Fprintf(os.Stderr, "round %d/%d %-26s %-10s %9.0f tps\n", r+1, rounds, w.label, t.name, res.tps)
			}
		}
	}
	fmt.Printf("\npgbench, %d clients (rows marked \"N clients\": N), %s × %d interleaved rounds (median), scale %d, shared_buffers %s, Unix sockets, %d CPUs, PostgreSQL %s\n",
		clients, duration, rounds, scale, cmp.Or(sharedBuffers, "32MB"), runtime.NumCPU(), pgVersion())
	fmt.Printf("pgward: separate process, audit durability=write parameters=full (pgw-async: durability=async; pgw-noaudit: no statement audit lines; pgw-1cpu: GOMAXPROCS=1; loop-noaudit: pgw-loop without statement audit lines); relay: separate process, 32 KiB copy loop, a goroutine per direction; relay-loop: the same bytes through one epoll event loop on one thread; pgbouncer: pool_mode=session, auth_type=scram-sha-256\n")
	if loopNice != 0 && eventLoopRow {
		fmt.Printf("pgw-loop: listen.event_loop_nice %d (its loop thread's nice value)\n", loopNice)
	}
	if baselineBin != "" {
		fmt.Printf("pgw-base, base+reuse: the baseline build %s, same configuration, in its own process\n", baselineBin)
	}
	fmt.Println()
	fmt.Printf("%-28s %-11s %9s %10s %9s %9s %9s %11s %12s %6s %11s %10s %14s %10s\n", "workload", "path", "tps", "latency ms", "+ms/stmt", "vs direct", "vs bouncer", "per round", "CPU s/100k stmt", "user", "cswch/stmt", "rq µs/stmt", "server µs/stmt", "vs relay")
	for _, w := range cases {
		direct := median(results[w.label+"|direct"])
		relayRes := median(results[w.label+"|relay"])
		bouncer, haveBouncer := results[w.label+"|pgbouncer"]
		for _, t := range targets {
			key := w.label + "|" + t.name
			if len(results[key]) == 0 {
				continue
			}
			med := median(results[key])
			c, cs, u, rq, srv := "-", "-", "-", "-", "-"
			if server != nil && stmts[key] > 0 {
				srv = fmt.Sprintf("%.1f", srvcpu[key].Seconds()/stmts[key]*1e6)
			}
			if t.pid != 0 && stmts[key] > 0 {
				rq = fmt.Sprintf("%.1f", rqwait[key].Seconds()/stmts[key]*1e6)
				c = fmt.Sprintf("%.2f", cpu[key].Seconds()/stmts[key]*100000)
				cs = fmt.Sprintf("%.2f", float64(switches[key])/stmts[key])
				if cpu[key] > 0 {
					u = fmt.Sprintf("%.0f%%", 100*ucpu[key].Seconds()/cpu[key].Seconds())
				}
			}
			vb, vbr := "-", "-"
			if haveBouncer {
				vb = fmt.Sprintf("%.2fx", med.tps/median(bouncer).tps)
				if lo, hi, ok := roundRatios(results[key], bouncer); ok {
					vbr = fmt.Sprintf("%.2f–%.2f", lo, hi)
				}
			}
			// What the path adds to each statement's latency (pgbench's
			// latency is per transaction).
			added := (med.latencyMS - direct.latencyMS) / w.stmts
			fmt.Printf("%-28s %-11s %9.0f %10.3f %9.3f %8.2fx %9s %11s %12s %6s %11s %10s %14s %9.2fx\n", w.label, t.name, med.tps, med.latencyMS, added, med.tps/direct.tps, vb, vbr, c, u, cs, rq, srv, med.tps/relayRes.tps)
		}
	}
	if len(cases) > len(wls) {
		sweepSummary(cases, clients, results)
	}
	if baselineBin != "" {
		compareBaseline(wls, results, cpu, stmts)
	}
	if ship != nil {
		ship.report()
	}
	rss, hwm := procRSS(pgw.Process.Pid)
	fmt.Printf("\npgward process: RSS %d KiB now, %d KiB peak\n", rss, hwm)
	if cpuprofile != "" {
		stopChild(pgw)
		stopChild(relay)
		fmt.Printf("CPU profiles: pgward %s, pgw-loop %s.loop, relay %s.relay (go tool pprof -top %s)\n", cpuprofile, cpuprofile, cpuprofile, cpuprofile)
	}
	return nil
}

// loopRelayRow is -relay-loop, eventLoopRow -event-loop, loopNetpollRow
// -loop-netpoll; sweepClients and sweepWorkloads are -sweep and
// -sweep-workloads.
var (
	loopRelayRow, eventLoopRow, loopNetpollRow bool
	sweepClients, sweepWorkloads               string
	loopNice                                   int    // -loop-nice
	sharedBuffers                              string // -shared-buffers
)

var sharedBuffersRE = regexp.MustCompile(`^[1-9][0-9]*(kB|MB|GB)$`)

// prewarm reads pgbench's tables and indexes into shared buffers, so the
// first round's first row does not pay for reading them in.
func prewarm(ctx context.Context, pg *testenv.Postgres) error {
	conn, err := pg.Admin(ctx)
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, "CREATE EXTENSION IF NOT EXISTS pg_prewarm"); err != nil {
		return fmt.Errorf("-shared-buffers needs the pg_prewarm extension (Debian's postgresql-15 package has it): %w", err)
	}
	var blocks int64
	if err := conn.QueryRow(ctx, `SELECT coalesce(sum(pg_prewarm(c.oid)), 0) FROM pg_class c
		JOIN pg_namespace n ON n.oid = c.relnamespace
		WHERE n.nspname = 'public' AND c.relname LIKE 'pgbench\_%' AND c.relkind IN ('r', 'i')`).Scan(&blocks); err != nil {
		return fmt.Errorf("prewarm: %w", err)
	}
	fmt.Fprintf(os.Stderr, "read pgbench's tables and indexes into shared_buffers (%s): %d MiB\n", sharedBuffers, blocks*8/1024)
	return nil
}

// benchCase is a workload at a number of clients.
type benchCase struct {
	workload
	clients int
	label   string // the workload's name, and the clients when not -clients
}

// benchCases is every workload at the default number of clients, then the
// -sweep-workloads at the -sweep client counts (named "… N clients").
func benchCases(wls []workload, clients int) ([]benchCase, error) {
	var out []benchCase
	for _, w := range wls {
		out = append(out, benchCase{w, clients, w.name})
	}
	if strings.TrimSpace(sweepClients) == "" {
		return out, nil
	}
	for _, f := range strings.Split(sweepClients, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 || n > 150 {
			return nil, fmt.Errorf("-sweep %q: want client counts from 1 to 150, comma-separated", sweepClients)
		}
		if n == clients {
			continue
		}
		for _, w := range wls {
			if strings.Contains(","+sweepWorkloads+",", ","+w.key+",") {
				c := benchCase{w, n, fmt.Sprintf("%s, %d client", w.name, n)}
				if n > 1 {
					c.label += "s"
				}
				out = append(out, c)
			}
		}
	}
	return out, nil
}

// sweepTarget says which paths run at the -sweep client counts: the ones
// the goals compare (direct is the limit, PgBouncer the bar).
func sweepTarget(name string) bool {
	switch name {
	case "direct", "relay", "relay-loop", "pgward", "pgw-loop", "pgw-base", "pgbouncer":
		return true
	}
	return false
}

// sweepSummary prints, per swept workload, pgward's ratio to PgBouncer at
// every client count and the latency each adds per statement over direct.
func sweepSummary(cases []benchCase, clients int, results map[string][]result) {
	fmt.Printf("\nby clients (tps ratio to PgBouncer; latency added per statement over direct, ms):\n")
	fmt.Printf("%-22s %8s %14s %12s %12s %12s %12s %12s\n", "workload", "clients", "pgward/bouncer", "pgw-loop/b", "relay-loop/b", "pgward +ms", "pgw-loop +ms", "bouncer +ms")
	sorted := append([]benchCase(nil), cases...)
	sort.SliceStable(sorted, func(i, j int) bool {
		return sorted[i].key < sorted[j].key || (sorted[i].key == sorted[j].key && sorted[i].clients < sorted[j].clients)
	})
	for _, w := range sorted {
		if !strings.Contains(","+sweepWorkloads+",", ","+w.key+",") {
			continue
		}
		get := func(path string) (result, bool) {
			r := results[w.label+"|"+path]
			return median(r), len(r) > 0
		}
		d, _ := get("direct")
		p, okp := get("pgward")
		b, okb := get("pgbouncer")
		l, okl := get("relay-loop")
		if !okp || !okb {
			continue
		}
		lr := "-"
		if okl {
			lr = fmt.Sprintf("%.2fx", l.tps/b.tps)
		}
		pl, pll := "-", "-"
		if e, ok := get("pgw-loop"); ok {
			pl, pll = fmt.Sprintf("%.2fx", e.tps/b.tps), fmt.Sprintf("%.3f", (e.latencyMS-d.latencyMS)/w.stmts)
		}
		fmt.Printf("%-22s %8d %13.2fx %12s %12s %12.3f %12s %12.3f\n", w.name, w.clients, p.tps/b.tps, pl, lr, (p.latencyMS-d.latencyMS)/w.stmts, pll, (b.latencyMS-d.latencyMS)/w.stmts)
	}
}

// pgwardBin and baselineBin are -pgward and -baseline.
var pgwardBin, baselineBin string

// baselineLoop is -baseline-event-loop.
var baselineLoop bool

// auditDir is -audit-dir: where the audit files go (default: beside the config).
var auditDir string

// auditPath is the audit file of the pgward whose config is in dir.
func auditPath(dir string) string {
	if auditDir == "" {
		return filepath.Join(dir, "audit.jsonl")
	}
	// The bench's temporary directory names the files (pgwb-NNN-audit.jsonl,
	// pgwb-NNN-pgw-async-audit.jsonl), so runs do not share them.
	name := strings.ReplaceAll(strings.TrimPrefix(dir, filepath.Dir(benchDir)+"/"), "/", "-")
	return filepath.Join(auditDir, name+"-audit.jsonl")
}

// benchDir is the bench's temporary directory.
var benchDir string

// writeAgentConfig writes pgward's config; auditExtra is added to the audit
// section (", key: value"), extra to the end (whole sections).
func writeAgentConfig(dir, path string, pg *testenv.Postgres, durability, auditExtra, extra string) error {
	secretsPath := filepath.Join(dir, "secrets.yaml")
	if err := os.WriteFile(secretsPath, fmt.Appendf(nil, "bench:\n  %[1]s: { password: %[2]q }\nbenchreuse:\n  %[1]s: { password: %[2]q }\n", testenv.ScramUser, testenv.ScramPassword), 0o600); err != nil {
		return err
	}
	cfg := fmt.Sprintf(`listen: { unix_dir: %[1]q, port: 5432 }
upstreams:
  bench: { address: %[2]q, database: %[3]q }
  benchreuse: { address: %[2]q, database: %[3]q, reuse: { max_idle: 64, idle_timeout: 5m } }
secrets: { backend: file, file: { path: %[4]q } }
principals:
  bench: { match: { uid: [%[5]d] } }
grants:
  - { principal: bench, upstream: bench, roles: [%[6]s] }
  - { principal: bench, upstream: benchreuse, roles: [%[6]s] }
limits: { auth_rate: 0, sessions_per_principal: 10000 }
audit: { path: %[7]q, durability: %[8]s, parameters: full, max_size: 268435456, max_files: 2%[9]s }
ebpf: { enabled: "false" }
`, dir, pg.SocketPath(), testenv.Database, secretsPath, os.Getuid(), testenv.ScramUser, auditPath(dir), durability, auditExtra) + extra
	return os.WriteFile(path, []byte(cfg), 0o600)
}

// startPgward starts a pgward row's process (the -pgward binary, or this
// program as the agent child, with its CPU profile at cpuprofile+suffix)
// and waits for its socket.
func startPgward(name, dir, cfg, cpuprofile, suffix string) (*exec.Cmd, error) {
	var c *exec.Cmd
	var err error
	if pgwardBin != "" {
		c, err = startBinary(pgwardBin, dir, cfg)
	} else {
		env := []string{"PGWARD_LOG_LEVEL=warn"} // as startBinary runs the binary
		if cpuprofile != "" {
			abs, _ := filepath.Abs(cpuprofile)
			env = append(env, "PGWARD_BENCH_CPUPROFILE="+abs+suffix)
		}
		c, err = startChild("agent", env, cfg)
	}
	if err != nil {
		return nil, err
	}
	if err := waitSocket(filepath.Join(dir, ".s.PGSQL.5432")); err != nil {
		stopChild(c)
		return nil, fmt.Errorf("%s did not start: %w", name, err)
	}
	return c, nil
}

// agentDir makes the directory of a second pgward row, name, under dir and
// writes its configuration (the pgward row's, with listen.event_loop when
// loop, and listen.event_loop_nice when nice is not 0).
func agentDir(dir, name string, pg *testenv.Postgres, loop bool, nice int) (string, string, error) {
	d := filepath.Join(dir, name)
	if err := os.Mkdir(d, 0o755); err != nil {
		return "", "", err
	}
	cfg := filepath.Join(d, "pgward.yaml")
	if err := writeAgentConfig(d, cfg, pg, "write", "", ""); err != nil {
		return "", "", err
	}
	if loop {
		if err := withEventLoop(cfg, nice); err != nil {
			return "", "", err
		}
	}
	return d, cfg, nil
}

// withEventLoop turns listen.event_loop on in the config at path, with
// listen.event_loop_nice when nice is not 0.
func withEventLoop(path string, nice int) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	add := "port: 5432, event_loop: true }"
	if nice != 0 {
		add = fmt.Sprintf("port: 5432, event_loop: true, event_loop_nice: %d }", nice)
	}
	out := bytes.Replace(b, []byte("port: 5432 }"), []byte(add), 1)
	if bytes.Equal(out, b) {
		return fmt.Errorf("%s: no listen line to add event_loop to", path)
	}
	return os.WriteFile(path, out, 0o600)
}

// runAgent is the pgward child: the agent with the config at path until
// SIGTERM, with its logger and tracer provider made as `pgward agent`
// makes them (the JSON logger at PGWARD_LOG_LEVEL, which startPgward sets
// to warn as startBinary does, here discarded; the tracer provider from the
// OTEL_* variables),
// so that its rows measure what `pgward agent` does.
func runAgent(path string) int {
	defer profileCPU()()
	cfg, err := agent.LoadConfig(path)
	if err != nil {
		fmt.Fprintln(os.Stderr, "agent config:", err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	log, err := exporter.NewLogger(io.Discard, os.Getenv)
	if err != nil {
		fmt.Fprintln(os.Stderr, "agent:", err)
		return 1
	}
	tp, shutdownTracing, err := exporter.NewTracerProvider(ctx, os.Getenv)
	if err != nil {
		fmt.Fprintln(os.Stderr, "agent: tracing:", err)
		return 1
	}
	defer shutdownTracing(context.Background())
	opts := agent.Options{Config: cfg, Logger: log, TracerProvider: tp}
	a, err := agent.New(ctx, opts)
	if err != nil {
		fmt.Fprintln(os.Stderr, "agent:", err)
		return 1
	}
	if err := a.Run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "agent:", err)
		return 1
	}
	return 0
}

// runNoAudit is the pgw-noaudit child: the broker and exporter's observer
// wired as the agent wires them (the config at path: file secrets, audit,
// metrics, peer-credential identity; no eBPF, admin socket or metrics
// listener, which the bench's agents do not use either), with the
// observer wrapped in noStatementAudit through the ordinary
// broker.Observer interface.
func runNoAudit(path string) int {
	fail := func(what string, err error) int {
		fmt.Fprintf(os.Stderr, "pgw-noaudit: %s: %v\n", what, err)
		return 1
	}
	cfg, err := agent.LoadConfig(path)
	if err != nil {
		return fail("config", err)
	}
	if cfg.Secrets.Backend != "file" {
		return fail("config", fmt.Errorf("secrets backend %q: the bench's pgw-noaudit reads only the file backend", cfg.Secrets.Backend))
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	log := slog.New(slog.DiscardHandler)
	m := exporter.NewMetrics(prometheus.NewRegistry())
	src, err := secrets.NewFile(cfg.Secrets.File, log)
	if err != nil {
		return fail("secrets", err)
	}
	aud, err := exporter.OpenAudit(cfg.Audit, m, log)
	if err != nil {
		return fail("audit", err)
	}
	defer aud.Close()
	obs := exporter.NewObserver(log, m, aud)
	defer obs.Close()
	srv, err := broker.New(broker.Options{Config: cfg.Config, Resolver: &agent.Resolver{}, Secrets: src, Observer: noStatementAudit{obs}, Logger: log})
	if err != nil {
		return fail("broker", err)
	}
	ln, err := broker.ListenUnix(cfg.Listen)
	if err != nil {
		return fail("listen", err)
	}
	serveErr := srv.Serve(ctx, ln) // until SIGTERM
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = srv.Shutdown(sctx) // sessions end (and are audited) before the audit closes
	if serveErr != nil && ctx.Err() == nil {
		return fail("serve", serveErr)
	}
	return 0
}

// noStatementAudit is the observer of the pgw-noaudit row: everything but
// the statements' audit lines (sessions are still audited, metrics and logs
// kept). It exists to measure what auditing each statement costs; pgward's
// configuration has no such mode.
type noStatementAudit struct{ broker.Observer }

func (o noStatementAudit) Begin(ctx context.Context, r *broker.Request) (context.Context, broker.RequestObserver) {
	ctx, req := o.Observer.Begin(ctx, r)
	return ctx, noStatementRequest{req}
}

type noStatementRequest struct{ broker.RequestObserver }

func (r noStatementRequest) Started(ctx context.Context, a *broker.AuthRequest, s *broker.SessionInfo) (broker.SessionObserver, error) {
	sess, err := r.RequestObserver.Started(ctx, a, s)
	if err != nil {
		return nil, err
	}
	return noStatementSession{sess}, nil
}

type noStatementSession struct{ broker.SessionObserver }

func (noStatementSession) Statements(context.Context, []*broker.QueryEvent) error { return nil }
func (noStatementSession) Result(context.Context, *broker.QueryEvent)             {}

// runRelay is the minimal relay child: every connection to listen is
// copied byte for byte to and from a new connection to upstream, with a
// 32 KiB buffer each way (what any userspace relay pays, and no more).
func runRelay(listen, upstream string) int {
	defer profileCPU()()
	ln, err := net.Listen("unix", listen)
	if err != nil {
		fmt.Fprintln(os.Stderr, "relay:", err)
		return 1
	}
	_ = os.Chmod(listen, 0o777)
	go func() {
		ch := make(chan os.Signal, 1)
		signal.Notify(ch, syscall.SIGTERM)
		<-ch
		ln.Close()
	}()
	for {
		c, err := ln.Accept()
		if err != nil {
			return 0
		}
		go func() {
			defer c.Close()
			u, err := net.Dial("unix", upstream)
			if err != nil {
				return
			}
			defer u.Close()
			done := make(chan struct{})
			go func() {
				copyBuf(u, c)
				u.(*net.UnixConn).CloseWrite()
				close(done)
			}()
			copyBuf(c, u)
			<-done
		}()
	}
}

func copyBuf(dst, src net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// startBinary runs a pgward binary, `bin agent --config cfg`, its log
// (WARN and above) in dir/pgward.log.
func startBinary(bin, dir, cfg string) (*exec.Cmd, error) {
	logf, err := os.Create(filepath.Join(dir, "pgward.log"))
	if err != nil {
		return nil, err
	}
	defer logf.Close() // the child has its own descriptor
	cmd := exec.Command(bin, "agent", "--config", cfg)
	cmd.Env = append(os.Environ(), "PGWARD_LOG_LEVEL=warn")
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	return cmd, nil
}

// compareBaseline prints this build's rows against the baseline build's,
// measured in the same rounds: tps, latency and CPU per statement ratios.
func compareBaseline(wls []workload, results map[string][]result, cpu map[string]time.Duration, stmts map[string]float64) {
	fmt.Printf("\nthis build vs the baseline %s (same run; tps > 1 and latency, CPU < 1 are better)\n\n", baselineBin)
	fmt.Printf("%-22s %-22s %10s %14s %10s\n", "workload", "rows", "tps ratio", "latency ratio", "CPU ratio")
	for _, w := range wls {
		pairs := [][2]string{{"pgward", "pgw-base"}, {"pgw+reuse", "base+reuse"}}
		if baselineLoop {
			pairs = [][2]string{{"pgw-loop", "pgw-base"}}
		}
		for _, p := range pairs {
			ours, base := results[w.name+"|"+p[0]], results[w.name+"|"+p[1]]
			if len(ours) == 0 || len(base) == 0 {
				continue
			}
			o, b := median(ours), median(base)
			c := "-"
			ok, bk := w.name+"|"+p[0], w.name+"|"+p[1]
			if stmts[ok] > 0 && stmts[bk] > 0 && cpu[bk] > 0 {
				c = fmt.Sprintf("%.3f", (cpu[ok].Seconds()/stmts[ok])/(cpu[bk].Seconds()/stmts[bk]))
			}
			fmt.Printf("%-22s %-22s %10.3f %14.3f %10s\n", w.name, p[0]+" / "+p[1], o.tps/b.tps, o.latencyMS/b.latencyMS, c)
		}
	}
}

func startChild(role string, env []string, args ...string) (*exec.Cmd, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(self, args...)
	cmd.Env = append(append(os.Environ(), "PGWARD_BENCH_ROLE="+role), env...)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	if role == "relay" || role == "relay-loop" {
		if err := waitSocket(args[0]); err != nil {
			return nil, err
		}
	}
	return cmd, nil
}

func stopChild(cmd *exec.Cmd) {
	if cmd.ProcessState != nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(15 * time.Second):
		_ = cmd.Process.Kill()
		<-done
	}
}

func waitSocket(path string) error {
	for i := 0; i < 300; i++ {
		if c, err := net.Dial("unix", path); err == nil {
			c.Close()
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("no socket %s", path)
}

// startPgBouncer runs PgBouncer in session mode as the test Postgres's
// account (it refuses to run as root), SCRAM both ways with the password
// in its auth file.
func startPgBouncer(dir string, pg *testenv.Postgres) (*exec.Cmd, string, error) {
	bin, err := exec.LookPath("pgbouncer")
	if err != nil {
		return nil, "", fmt.Errorf("pgbouncer not installed (apt-get install pgbouncer; make deps)")
	}
	bdir := filepath.Join(dir, "bouncer")
	if err := os.Mkdir(bdir, 0o755); err != nil {
		return nil, "", err
	}
	uid, gid := uint32(os.Getuid()), uint32(os.Getgid())
	if os.Geteuid() == 0 {
		u, err := user.Lookup(testenv.ServerUserName)
		if err != nil {
			return nil, "", err
		}
		id, _ := strconv.Atoi(u.Uid)
		g, _ := strconv.Atoi(u.Gid)
		uid, gid = uint32(id), uint32(g)
	}
	ini := fmt.Sprintf(`[databases]
bench = host=%s port=%d dbname=%s
[pgbouncer]
listen_addr =
listen_port = 6432
unix_socket_dir = %s
auth_type = scram-sha-256
auth_file = %s/userlist.txt
pool_mode = session
max_client_conn = 500
default_pool_size = 100
logfile = %s/pgbouncer.log
pidfile = %s/pgbouncer.pid
log_connections = 0
log_disconnections = 0
`, pg.SocketDir, pg.Port, testenv.Database, bdir, bdir, bdir, bdir)
	files := map[string]string{"pgbouncer.ini": ini, "userlist.txt": fmt.Sprintf("%q %q\n", testenv.ScramUser, testenv.ScramPassword)}
	for name, body := range files {
		p := filepath.Join(bdir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			return nil, "", err
		}
		_ = os.Chown(p, int(uid), int(gid))
	}
	_ = os.Chown(bdir, int(uid), int(gid))
	cmd := testenv.RunAs(uid, gid, bin, "-q", filepath.Join(bdir, "pgbouncer.ini"))
	if err := cmd.Start(); err != nil {
		return nil, "", err
	}
	if err := waitSocket(filepath.Join(bdir, ".s.PGSQL.6432")); err != nil {
		stopChild(cmd)
		return nil, "", err
	}
	return cmd, bdir, nil
}

var (
	tpsRe = regexp.MustCompile(`tps = ([0-9.]+) \((without initial|including reconnection)`)
	latRe = regexp.MustCompile(`latency average = ([0-9.]+) ms`)
)

// errInterrupted is run's error when a signal stopped it.
var errInterrupted = errors.New("interrupted: stopped the children and the server, removed the temporary files")

func pgbench(ctx context.Context, t target, w workload, clients int, d time.Duration) (result, error) {
	args := append([]string{"-n"}, w.args...)
	args = append(args, "-c", strconv.Itoa(clients), "-j", strconv.Itoa(min(2, clients)), "-T", strconv.Itoa(int(d.Seconds())),
		"-h", t.host, "-p", strconv.Itoa(t.port), "-U", testenv.ScramUser, t.db)
	cmd := exec.CommandContext(ctx, "pgbench", args...)
	cmd.Env = append(os.Environ(), t.env...)
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

// roundRatios gives the lowest and highest of the rounds' tps ratios of rs
// to bouncer, each round against PgBouncer's run of the same round (the
// rounds are interleaved, so both have one result per round, in order).
func roundRatios(rs, bouncer []result) (lo, hi float64, ok bool) {
	if len(rs) == 0 || len(rs) != len(bouncer) {
		return 0, 0, false
	}
	for i, r := range rs {
		if bouncer[i].tps <= 0 {
			return 0, 0, false
		}
		q := r.tps / bouncer[i].tps
		if i == 0 || q < lo {
			lo = q
		}
		if i == 0 || q > hi {
			hi = q
		}
	}
	return lo, hi, true
}

func median(rs []result) result {
	if len(rs) == 0 {
		return result{tps: 1}
	}
	s := append([]result(nil), rs...)
	sort.Slice(s, func(i, j int) bool { return s[i].tps < s[j].tps })
	return s[len(s)/2]
}

// procRunDelay is how long the threads of process pid were runnable but
// waiting for a CPU (the second field of each thread's schedstat, summed):
// what the kernel's scheduler, not the path's own work, adds to its
// latency. Threads that exited are not counted.
func procRunDelay(pid int) time.Duration {
	if pid == 0 {
		return 0
	}
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return 0
	}
	var sum int64
	for _, t := range tasks {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/schedstat", pid, t.Name()))
		if err != nil {
			continue
		}
		if f := strings.Fields(string(b)); len(f) >= 2 {
			v, _ := strconv.ParseInt(f[1], 10, 64)
			sum += v
		}
	}
	return time.Duration(sum)
}

// procTimes is utime and stime of /proc/pid/stat (0: none): the user part
// is how much of a row's CPU is its own code rather than the kernel's
// (system calls, faults, wake-ups).
func procTimes(pid int) (user, sys time.Duration) {
	if pid == 0 {
		return 0, 0
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(ut) * time.Second / 100, time.Duration(st) * time.Second / 100 // USER_HZ
}

// procSwitches is the number of context switches (voluntary and not) of
// all threads of process pid so far (0: none). A thread that has exited
// takes its count with it, which the Go runtime's long-lived threads don't.
func procSwitches(pid int) int64 {
	if pid == 0 {
		return 0
	}
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/status", pid))
	var n int64
	for _, p := range tasks {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		for _, l := range strings.Split(string(b), "\n") {
			if f := strings.Fields(l); len(f) == 2 && strings.HasSuffix(f[0], "ctxt_switches:") {
				v, _ := strconv.ParseInt(f[1], 10, 64)
				n += v
			}
		}
	}
	return n
}

// procRSS is VmRSS and VmHWM of pid in KiB.
func procRSS(pid int) (rss, hwm int64) {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) >= 2 {
			switch f[0] {
			case "VmRSS:":
				rss, _ = strconv.ParseInt(f[1], 10, 64)
			case "VmHWM:":
				hwm, _ = strconv.ParseInt(f[1], 10, 64)
			}
		}
	}
	return rss, hwm
}

func pgVersion() string {
	out, err := exec.Command("pgbench", "--version").Output()
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(out))
	return f[len(f)-1]
}

// profileCPU starts a CPU profile of this child process when the bench
// asked for one (PGWARD_BENCH_CPUPROFILE, from -cpuprofile), and returns
// what stops it.
func profileCPU() (stop func()) {
	p := os.Getenv("PGWARD_BENCH_CPUPROFILE")
	if p == "" {
		return func() {}
	}
	f, err := os.Create(p)
	if err != nil {
		return func() {}
	}
	_ = pprof.StartCPUProfile(f)
	return func() { pprof.StopCPUProfile(); f.Close() }
}
