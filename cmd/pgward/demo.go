package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"go.opentelemetry.io/otel"

	"github.com/pgward/pgward/agent"
	"github.com/pgward/pgward/broker"
	"github.com/pgward/pgward/broker/secrets"
	"github.com/pgward/pgward/exporter"
	"github.com/pgward/pgward/testenv"
)

// The demo's example database and role, created in the private Postgres.
const (
	demoDB       = "orders"
	demoRole     = "orders_rw"
	demoPassword = "demo-only-password-held-by-pgward"
)

func cmdDemo(args []string, stdout, stderr io.Writer) int {
	v := newVerb("demo", "", "Start a private PostgreSQL and an agent with an example policy, and print the psql line to try.", 0, 0)
	check := v.fs.Bool("check", false, "run the printed psql command once, report, and exit (for tests and CI)")
	if _, code, ok := v.parse(args, stdout, stderr); !ok {
		return code
	}
	log, err := exporter.NewLogger(stderr, os.Getenv)
	if err != nil {
		fmt.Fprintln(stderr, "pgward:", err)
		return exitUsage
	}
	ctx, stop := signalContext(nil)
	defer stop()

	if _, err := testenv.FindBinDir(); err != nil {
		fmt.Fprintf(stderr, "pgward demo needs the PostgreSQL server binaries: %v\nInstall them with: %s\n", err, testenv.InstallCommand)
		return exitFailure
	}
	fmt.Fprintln(stderr, "pgward demo: starting a private PostgreSQL…")
	sctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	pg, err := testenv.StartPostgres(sctx, testenv.Options{Logf: func(f string, a ...any) { log.Debug(fmt.Sprintf(f, a...)) }})
	cancel()
	if err != nil {
		fmt.Fprintln(stderr, "pgward demo: start PostgreSQL:", err)
		return exitFailure
	}
	defer pg.Stop()
	for _, sql := range []string{
		fmt.Sprintf(`CREATE ROLE %s LOGIN PASSWORD '%s'`, demoRole, demoPassword),
		fmt.Sprintf(`CREATE DATABASE %s OWNER %s`, demoDB, demoRole),
	} {
		if err := pg.Exec(ctx, sql); err != nil {
			fmt.Fprintln(stderr, "pgward demo: create the example role and database:", err)
			return exitFailure
		}
	}

	dir, err := os.MkdirTemp("", "pgward-demo-")
	if err != nil {
		fmt.Fprintln(stderr, "pgward demo:", err)
		return exitFailure
	}
	defer os.RemoveAll(dir)
	_ = os.Chmod(dir, 0o755)
	secretsPath := filepath.Join(dir, "secrets.yaml")
	if err := os.WriteFile(secretsPath, []byte(fmt.Sprintf("%s:\n  %s: { password: %q }\n", demoDB, demoRole, demoPassword)), 0o600); err != nil {
		fmt.Fprintln(stderr, "pgward demo:", err)
		return exitFailure
	}
	uid := uint32(os.Getuid())
	metricsAddr := "127.0.0.1:9187"
	if ln, err := net.Listen("tcp", metricsAddr); err != nil {
		metricsAddr = "127.0.0.1:0"
	} else {
		ln.Close()
	}
	cfg := &agent.Config{
		Config: broker.Config{
			Listen: broker.ListenConfig{UnixDir: dir, Port: 5432},
			Upstreams: map[string]broker.UpstreamConfig{
				demoDB: {Address: pg.TCPAddr(), Database: demoDB, TLS: broker.TLSConfig{Mode: "verify-full", CAFile: pg.CAFile, ServerName: "localhost"}},
			},
			Principals: map[string]broker.Principal{"you": {Match: broker.Selectors{UID: []uint32{uid}}}},
			Grants:     []broker.Grant{{Principal: "you", Upstream: demoDB, Roles: []string{demoRole}}},
		},
		Secrets: agent.SecretsConfig{Backend: "file", File: secrets.FileConfig{Path: secretsPath}},
		Audit:   exporter.AuditConfig{Path: filepath.Join(dir, "audit.jsonl"), Durability: exporter.DurabilityWrite, Parameters: exporter.ParamsFull},
		Metrics: agent.MetricsConfig{Listen: metricsAddr},
		EBPF:    agent.EBPFConfig{Enabled: "auto"},
	}
	if err := cfg.Validate(); err != nil {
		fmt.Fprintln(stderr, "pgward demo: example config invalid:", err)
		return exitFailure
	}
	otel.SetErrorHandler(exporter.OTelErrorHandler(log))
	tp, shutdownTracing, err := exporter.NewTracerProvider(ctx, os.Getenv, exporter.WithConsole(stdout))
	if err != nil {
		fmt.Fprintln(stderr, "pgward demo: tracing:", err)
		return exitFailure
	}
	defer shutdownTracing(context.Background())
	cfg.Shutdown.Grace = 2 * time.Second
	a, err := agent.New(ctx, agent.Options{Config: cfg, Logger: log, TracerProvider: tp})
	if err != nil {
		fmt.Fprintln(stderr, "pgward demo: start agent:", err)
		return exitFailure
	}
	runErr := make(chan error, 1)
	runCtx, stopRun := context.WithCancel(ctx)
	defer stopRun()
	go func() { runErr <- a.Run(runCtx) }()

	psqlLine := fmt.Sprintf(`psql "host=%s user=%s dbname=%s"`, dir, demoRole, demoDB)
	fmt.Fprintf(stdout, `
pgward is running with an example policy: uid %d may use role %s on upstream %s.
No password is needed; pgward holds it. Try:

    %s

Audit log: %s
Metrics:   http://%s/metrics
Traces:    %s
Press Ctrl-C to stop and clean up.
`, uid, demoRole, demoDB, psqlLine, cfg.Audit.Path, a.MetricsAddr(), demoTraceHint(os.Getenv))

	if *check {
		code := demoCheck(ctx, dir, cfg.Audit.Path, stdout, stderr)
		stopRun()
		<-runErr
		return code
	}
	select {
	case <-ctx.Done():
		fmt.Fprintln(stderr, "pgward demo: stopping and cleaning up")
	case err := <-runErr:
		if err != nil {
			fmt.Fprintln(stderr, "pgward demo: agent stopped:", err)
			return exitFailure
		}
	}
	stopRun()
	<-runErr
	return exitOK
}

// demoCheck runs the printed psql command once and checks the audit trail.
func demoCheck(ctx context.Context, dir, auditPath string, stdout, stderr io.Writer) int {
	cmd := exec.CommandContext(ctx, "psql", "host="+dir+" user="+demoRole+" dbname="+demoDB, "-XAtc", "select current_user || ' ' || current_database()")
	cmd.Env = append(os.Environ(), "PGPASSWORD=", "PGCONNECT_TIMEOUT=10")
	out, err := cmd.CombinedOutput()
	if err != nil {
		fmt.Fprintf(stderr, "demo check: psql failed: %v\n%s", err, out)
		return exitFailure
	}
	if got := strings.TrimSpace(string(out)); got != demoRole+" "+demoDB {
		fmt.Fprintf(stderr, "demo check: psql printed %q\n", got)
		return exitFailure
	}
	audit, err := os.ReadFile(auditPath)
	if err != nil || !strings.Contains(string(audit), `"db.session.query"`) {
		fmt.Fprintf(stderr, "demo check: no query in the audit log (%v)\n", err)
		return exitFailure
	}
	if strings.Contains(string(audit), demoPassword) {
		fmt.Fprintln(stderr, "demo check: the password is in the audit log")
		return exitFailure
	}
	n, err := exporter.VerifyFiles(auditPath)
	if err != nil {
		fmt.Fprintf(stderr, "demo check: audit chain: %v\n", err)
		return exitFailure
	}
	fmt.Fprintf(stdout, "demo check: audit chain ok (%d events)\n", n)
	fmt.Fprintln(stdout, "demo check: ok: psql connected with no password and the query was audited")
	return exitOK
}

// demoTraceHint says where the demo's session traces go and how to see them.
func demoTraceHint(env func(string) string) string {
	switch {
	case env("OTEL_TRACES_EXPORTER") == "console":
		return "printed below, one JSON line per span (pgward.session → pgward.auth → identity.verify, credentials.fetch, upstream.auth; a span per statement); the trace id is the request_id in the log and the audit log"
	case env("OTEL_TRACES_EXPORTER") == "none":
		return "off (OTEL_TRACES_EXPORTER=none)"
	case env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") != "" || env("OTEL_EXPORTER_OTLP_ENDPOINT") != "":
		return "exported by OTLP to " + env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") + env("OTEL_EXPORTER_OTLP_ENDPOINT")
	}
	return "not exported; to see each session's spans here, run with OTEL_TRACES_EXPORTER=console (make demo does)"
}
