package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"sync"
	"syscall"

	"go.opentelemetry.io/otel"
	"k8s.io/klog/v2"

	"github.com/pgward/pgward/agent"
	"github.com/pgward/pgward/exporter"
)

func cmdAgent(args []string, stdout, stderr io.Writer) int {
	v := newVerb("agent", "", "Run the node agent until SIGTERM or SIGINT; SIGHUP reloads the configuration.", 0, 0)
	configPath := v.fs.String("config", "/etc/pgward/pgward.yaml", "configuration file")
	if _, code, ok := v.parse(args, stdout, stderr); !ok {
		return code
	}
	log, err := exporter.NewLogger(stderr, os.Getenv)
	if err != nil {
		fmt.Fprintln(stderr, "pgward:", err)
		return exitUsage
	}
	cfg, err := agent.LoadConfig(*configPath)
	if err != nil {
		fmt.Fprintln(stderr, "pgward: invalid configuration:")
		fmt.Fprintln(stderr, err)
		return exitBadInput
	}
	// The SDK reports export failures through its global handler: make
	// them structured log lines, not plain text inside the JSON log.
	otel.SetErrorHandler(exporter.OTelErrorHandler(log))
	tp, shutdownTracing, err := exporter.NewTracerProvider(context.Background(), os.Getenv, exporter.WithConsole(stdout))
	if err != nil {
		fmt.Fprintln(stderr, "pgward: tracing:", err)
		return exitUsage
	}
	defer shutdownTracing(context.Background())
	notifier, err := agent.NotifierFromEnv(os.Getenv, os.Getpid())
	if err != nil {
		// Not fatal: the unit may be Type=simple with a stray variable.
		log.Warn("systemd notifications off", "err", err)
	}
	defer notifier.Close()
	if cfg.Kubernetes.Enabled {
		// client-go logs through klog; send it to our logger.
		klog.SetSlogLogger(log.With("component", "client-go"))
	}

	// SIGHUP is handled on the signal goroutine from here on, while New
	// still runs: hup hands it the agent once there is one, and a SIGHUP
	// that came before is applied then.
	hup := &reloader{log: log}
	ctx, stop := signalContext(hup.signal)
	defer stop()
	a, err := agent.New(ctx, agent.Options{Config: cfg, ConfigPath: *configPath, Logger: log, TracerProvider: tp, Notifier: notifier})
	if err != nil {
		log.Error("cannot start", "err", err)
		return exitFailure
	}
	hup.started(a)
	if err := a.Run(ctx); err != nil {
		log.Error("agent stopped", "err", err)
		return exitFailure
	}
	return exitOK
}

// reloader runs the agent's Reload on SIGHUP. The signal goroutine calls
// signal, main calls started once New returned; a SIGHUP before that is
// remembered and applied by started, since the file may have changed
// after LoadConfig read it.
type reloader struct {
	log     *slog.Logger
	mu      sync.Mutex
	agent   *agent.Agent
	pending bool
}

func (r *reloader) signal() {
	r.mu.Lock()
	a := r.agent
	r.pending = a == nil
	r.mu.Unlock()
	if a != nil {
		r.reload(a)
	}
}

func (r *reloader) started(a *agent.Agent) {
	r.mu.Lock()
	r.agent = a
	pending := r.pending
	r.mu.Unlock()
	if pending {
		r.reload(a)
	}
}

func (r *reloader) reload(a *agent.Agent) {
	if err := a.Reload(); err != nil {
		r.log.Error("reload refused: keeping the running configuration", "err", err)
	}
}

func cmdReload(args []string, stdout, stderr io.Writer) int {
	v := newVerb("reload", "", "Ask a running agent to reload its configuration, as SIGHUP does (with systemd: systemctl reload pgward).", 0, 0)
	pid := v.fs.Int("pid", 0, "pid of the running agent (required)")
	if _, code, ok := v.parse(args, stdout, stderr); !ok {
		return code
	}
	if *pid <= 0 {
		fmt.Fprintln(stderr, "pgward reload: --pid PID is required (systemd: systemctl reload pgward)")
		return exitUsage
	}
	if err := checkAgentPid(*pid); err != nil {
		fmt.Fprintf(stderr, "pgward reload: %v; nothing signalled\n", err)
		return exitFailure
	}
	if err := syscall.Kill(*pid, syscall.SIGHUP); err != nil {
		fmt.Fprintf(stderr, "pgward reload: signal pid %s: %v\n", strconv.Itoa(*pid), err)
		return exitFailure
	}
	return exitOK
}
