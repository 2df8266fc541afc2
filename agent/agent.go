package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/trace"
	"k8s.io/client-go/kubernetes"

	"github.com/pgward/pgward/broker"
	"github.com/pgward/pgward/broker/secrets"
	"github.com/pgward/pgward/broker/secrets/vault"
	"github.com/pgward/pgward/exporter"
)

// Options are what New needs.
type Options struct {
	Config     *Config
	ConfigPath string // for Reload; may be empty
	Logger     *slog.Logger
	// TracerProvider for the session traces; nil mints ids without exporting.
	TracerProvider trace.TracerProvider
	// Notifier tells systemd about readiness, draining, reloads and
	// liveness (Type=notify); nil when not run by systemd.
	Notifier *Notifier
	// KubeClient is used for pod identity instead of the one
	// kubernetes.kubeconfig (or the in-cluster service account) gives; for tests.
	KubeClient kubernetes.Interface
}

// Agent is the node agent: broker, identity, secrets, audit, metrics and
// eBPF, wired together.
type Agent struct {
	log      *slog.Logger
	cfgPath  string
	cfg      *Config
	broker   *broker.Server
	resolver *Resolver
	metrics  *exporter.Metrics
	audit    *exporter.Audit
	observer *exporter.Observer
	source   secrets.Source
	closers  []func() error // closed in reverse order

	unixLn    *net.UnixListener
	tcpLn     net.Listener
	metricsLn net.Listener
	httpSrv   *http.Server
	ebpf      *ebpfState
	notify    *Notifier
	pods      *PodIndex // nil unless kubernetes.enabled
	admin     *adminServer

	// cfgMu guards cfg, which Reload replaces while Run and the
	// accessors read it; reloadMu serialises reloads.
	cfgMu    sync.Mutex
	reloadMu sync.Mutex

	mu     sync.Mutex
	closed bool
}

// New builds the agent and opens its listeners. It cleans up what it opened
// when it fails.
func New(ctx context.Context, opts Options) (_ *Agent, err error) {
	if opts.Config == nil {
		return nil, errors.New("agent: no configuration")
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	// a is not the named result: a failure returns nil, and the deferred
	// cleanup still needs a.
	cfg := opts.Config.WithDefaults() // a Config built in Go gets the defaults LoadConfig applies
	a := &Agent{log: log, cfg: cfg, cfgPath: opts.ConfigPath, notify: opts.Notifier}
	defer func() {
		if err != nil {
			a.closeAll()
		}
	}()

	reg := prometheus.NewRegistry()
	a.metrics = exporter.NewMetrics(reg)

	// The secrets backends first: the audit's checkpoint key lives there.
	a.source, err = newSource(cfg, log, a.metrics)
	if err != nil {
		return nil, err
	}
	if c, ok := a.source.(interface{ Close() error }); ok {
		a.closers = append(a.closers, c.Close)
	}
	var auditOpts []exporter.AuditOption
	if cfg.Audit.Checkpoint.Key != nil {
		key, err := checkpointKey(ctx, cfg, a.source.(*router), log)
		if err != nil {
			return nil, err
		}
		auditOpts = append(auditOpts, exporter.WithCheckpointKey(key))
	} else {
		log.Warn("audit checkpoints are off (no audit.checkpoint.key): "+uncheckpointedWarning, "path", cfg.Audit.Path)
	}
	var ship *exporter.Shipper
	if exporter.ShipEnabled(cfg.Audit.OTLP, nil) {
		// Closed after the audit (closers run in reverse).
		if ship, err = exporter.NewShipper(cfg.Audit, a.metrics, log); err != nil {
			return nil, fmt.Errorf("audit.otlp: %w", err)
		}
		a.closers = append(a.closers, ship.Close)
		auditOpts = append(auditOpts, exporter.WithShipper(ship))
	}
	a.audit, err = exporter.OpenAudit(cfg.Audit, a.metrics, log, auditOpts...)
	if err != nil {
		return nil, fmt.Errorf("open audit log: %w", err)
	}
	a.closers = append(a.closers, a.audit.Close)
	if ship != nil {
		ship.Start()
		log.Info("audit shipping on", "shipper", ship.String())
	}
	a.observer = exporter.NewObserver(log, a.metrics, a.audit, exporter.WithTracerProvider(opts.TracerProvider))
	a.closers = append(a.closers, a.observer.Close) // refusal summaries, before the audit closes

	a.resolver = &Resolver{RequireEBPF: cfg.Identity.RequireEBPF}
	if err := a.startKubernetes(opts.KubeClient); err != nil {
		return nil, err
	}
	if err := a.startEBPF(ctx); err != nil {
		return nil, err
	}

	a.broker, err = broker.New(broker.Options{
		Config:   cfg.Config,
		Resolver: a.resolver,
		Secrets:  a.source,
		Observer: a.observer,
		Logger:   log,
	})
	if err != nil {
		return nil, err
	}
	a.metrics.SetBufferStats(a.broker.BufferStats)

	a.unixLn, err = broker.ListenUnix(cfg.Listen)
	if err != nil {
		return nil, err
	}
	a.closers = append(a.closers, a.unixLn.Close)
	if err := a.openAdmin(); err != nil {
		return nil, err
	}
	if cfg.Listen.TCP != "" {
		a.tcpLn, err = net.Listen("tcp", cfg.Listen.TCP)
		if err != nil {
			return nil, fmt.Errorf("listen.tcp: %w", err)
		}
		a.closers = append(a.closers, a.tcpLn.Close)
		if a.ebpf != nil {
			a.ebpf.watchTCP(a.tcpLn.Addr())
		}
	}
	if cfg.Metrics.Listen != "" {
		a.metricsLn, err = net.Listen("tcp", cfg.Metrics.Listen)
		if err != nil {
			return nil, fmt.Errorf("metrics.listen: %w", err)
		}
		a.closers = append(a.closers, a.metricsLn.Close)
		a.httpSrv = &http.Server{Handler: a.metrics.Handler(a.ready), ReadHeaderTimeout: 5 * time.Second}
	}
	return a, nil
}

// newSource builds every secrets backend the configuration uses
// (secrets.backend, and upstreams.<name>.secrets where set) and routes each
// upstream to its own, so that one backend's outage leaves the others'
// upstreams working.
//
// The client certificates of Vault's PKI engine are counted in m.
func newSource(cfg *Config, log *slog.Logger, m *exporter.Metrics) (secrets.Source, error) {
	backends := map[string]secrets.Source{}
	route := map[string]secrets.Source{}
	certObs := vault.WithCertObserver(func(ev vault.CertEvent) {
		m.ClientCert(ev.Upstream, ev.Role, ev.Renewal, ev.Err != nil, ev.NotAfter)
	})
	for name, u := range cfg.Upstreams {
		b := u.Secrets // defaults applied: secrets.backend when unset
		if b == "vault" && slices.Contains(u.Auth, broker.AuthCert) {
			m.ClientCertUpstreams(name)
		}
		if backends[b] == nil {
			src, err := openBackend(b, cfg, log, certObs)
			if err != nil {
				for _, s := range backends {
					if c, ok := s.(interface{ Close() error }); ok {
						c.Close()
					}
				}
				return nil, err
			}
			backends[b] = src
		}
		route[name] = backends[b]
	}
	return &router{route: route, backends: backends}, nil
}

// openBackend opens the secrets backend name; vaultOpts are for Vault's.
func openBackend(name string, cfg *Config, log *slog.Logger, vaultOpts ...vault.Option) (secrets.Source, error) {
	switch name {
	case "file":
		f, err := secrets.NewFile(cfg.Secrets.File, log)
		if err != nil {
			return nil, fmt.Errorf("secrets backend file: %w", err)
		}
		return f, nil
	case "env":
		return secrets.NewEnv(cfg.Secrets.Env), nil
	case "vault":
		if cfg.Secrets.Vault == nil {
			return nil, errors.New("secrets backend vault: secrets.vault is not configured")
		}
		return newVaultSource(cfg, log, vaultOpts...)
	}
	return nil, broker.CheckChoice("secrets.backend", name, secrets.Backends)
}

// router sends each upstream's fetches to its backend.
type router struct {
	route    map[string]secrets.Source
	backends map[string]secrets.Source
}

func (r *router) Fetch(ctx context.Context, upstream, role string) (secrets.Credential, error) {
	src := r.route[upstream]
	if src == nil {
		return secrets.Credential{}, fmt.Errorf("upstream %s: %w", upstream, secrets.ErrNotFound)
	}
	return src.Fetch(ctx, upstream, role)
}

func (r *router) Close() error {
	for _, s := range r.backends {
		if c, ok := s.(interface{ Close() error }); ok {
			c.Close()
		}
	}
	return nil
}

func (r *router) file() *secrets.File {
	f, _ := r.backends["file"].(*secrets.File)
	return f
}

// ready is /readyz.
func (a *Agent) ready() (bool, string) {
	if a.broker.Draining() {
		return false, "draining"
	}
	if a.pods != nil && !a.pods.Synced() {
		return false, "kubernetes: the node's pod list is not synced yet"
	}
	if a.ebpf == nil || a.ebpf.tracker == nil {
		return true, "ebpf: not attached (peer credentials only)"
	}
	return true, ""
}

// SocketPath is the node socket clients connect to.
func (a *Agent) SocketPath() string { return a.config().Listen.SocketPath() }

// config is the running configuration.
func (a *Agent) config() *Config {
	a.cfgMu.Lock()
	defer a.cfgMu.Unlock()
	return a.cfg
}

// MetricsAddr is the address of the metrics endpoint, or nil.
func (a *Agent) MetricsAddr() net.Addr {
	if a.metricsLn == nil {
		return nil
	}
	return a.metricsLn.Addr()
}

// TCPAddr is the loopback TCP listener's address, or nil.
func (a *Agent) TCPAddr() net.Addr {
	if a.tcpLn == nil {
		return nil
	}
	return a.tcpLn.Addr()
}

// Broker is the running broker (for tests and the CLI).
func (a *Agent) Broker() *broker.Server { return a.broker }

// Run serves until ctx ends, then drains for the configured grace period
// and closes everything. A second cancellation is the caller's business
// (cmd exits at once).
func (a *Agent) Run(ctx context.Context) error {
	serveCtx, stop := context.WithCancel(context.WithoutCancel(ctx))
	defer stop()
	errc := make(chan error, 3)
	n := 1
	go func() { errc <- a.broker.Serve(serveCtx, a.unixLn) }()
	if a.tcpLn != nil {
		n++
		go func() { errc <- a.broker.Serve(serveCtx, a.tcpLn) }()
	}
	if a.httpSrv != nil {
		go func() {
			if err := a.httpSrv.Serve(a.metricsLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
				a.log.Error("metrics endpoint failed", "err", err)
			}
		}()
	}
	if a.ebpf != nil {
		a.ebpf.run(serveCtx)
	}
	a.admin.serve()
	// The addresses actually bound: "127.0.0.1:0" in the file is a real port here.
	metrics, tcp := "", ""
	if addr := a.MetricsAddr(); addr != nil {
		metrics = addr.String()
	}
	if a.tcpLn != nil {
		tcp = a.tcpLn.Addr().String()
	}
	a.log.Info("pgward agent ready", "socket", a.SocketPath(), "metrics", metrics, "tcp", tcp)
	a.sdNotify("READY=1", "STATUS=serving on "+a.SocketPath())
	wdCtx, stopWatchdog := context.WithCancel(context.Background())
	wdDone := make(chan struct{})
	go func() {
		defer close(wdDone)
		a.notify.runWatchdog(wdCtx, func(err error) { a.log.Warn("systemd watchdog keep-alive failed", "err", err) })
	}()
	defer func() { stopWatchdog(); <-wdDone }()
	var runErr error
	select {
	case <-ctx.Done():
	case err := <-errc:
		n--
		if err != nil && !errors.Is(err, broker.ErrServerClosed) {
			runErr = err
		}
	}
	grace := a.config().Shutdown.Grace
	a.log.Info("draining sessions", "grace", grace, "sessions", a.broker.ActiveSessions())
	a.sdNotify("STOPPING=1", fmt.Sprintf("STATUS=draining %d sessions for up to %s", a.broker.ActiveSessions(), grace))
	dctx, cancel := context.WithTimeout(context.Background(), grace)
	err := a.broker.Shutdown(dctx)
	cancel()
	if err != nil {
		a.log.Warn("grace period over: ended the remaining sessions", "err", err)
	}
	stop()
	for ; n > 0; n-- {
		<-errc
	}
	a.closeAll()
	return runErr
}

// Reload re-reads the configuration file and applies policy, upstreams and
// secrets settings. An invalid file changes nothing; the error lists every
// problem.
func (a *Agent) Reload() error {
	if a.cfgPath == "" {
		return errors.New("reload: the agent was not started from a file")
	}
	// Type=notify units may tell systemd a reload is under way; READY=1
	// ends it whatever the outcome (the old configuration keeps serving).
	a.sdNotify("RELOADING=1", "STATUS=reloading "+a.cfgPath)
	defer a.sdNotify("READY=1", "STATUS=serving on "+a.SocketPath())
	a.reloadMu.Lock()
	defer a.reloadMu.Unlock()
	old := a.config()
	cfg, err := LoadConfig(a.cfgPath)
	if err != nil {
		return err
	}
	if cfg.Listen != old.Listen {
		a.log.Warn("reload: listen settings changed; they take effect at restart")
		cfg.Listen = old.Listen
	}
	if cfg.Admin != old.Admin {
		a.log.Warn("reload: admin settings changed; they take effect at restart")
		cfg.Admin = old.Admin
	}
	if cfg.Kubernetes != old.Kubernetes {
		a.log.Warn("reload: kubernetes settings changed; they take effect at restart")
		cfg.Kubernetes = old.Kubernetes
	}
	if err := a.broker.Reload(cfg.Config); err != nil {
		return err
	}
	if f := a.source.(*router).file(); f != nil {
		if err := f.Reload(); err != nil {
			a.log.Warn("reload: secrets file invalid; keeping the last good content", "err", err)
		}
	}
	a.cfgMu.Lock()
	a.cfg = cfg
	a.cfgMu.Unlock()
	a.log.Info("configuration reloaded", "path", a.cfgPath)
	return nil
}

// sdNotify tells systemd about a state change; failures are logged, never fatal.
func (a *Agent) sdNotify(state ...string) {
	if err := a.notify.Notify(state...); err != nil {
		a.log.Warn("systemd notification failed", "state", state[0], "err", err)
	}
}

// Close stops everything at once. It is idempotent.
func (a *Agent) Close() error {
	if a.broker != nil {
		a.broker.Close()
	}
	a.closeAll()
	return nil
}

func (a *Agent) closeAll() {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed {
		return
	}
	a.closed = true
	if a.httpSrv != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_ = a.httpSrv.Shutdown(ctx)
		cancel()
	}
	for i := len(a.closers) - 1; i >= 0; i-- {
		if err := a.closers[i](); err != nil && !errors.Is(err, net.ErrClosed) && !errors.Is(err, os.ErrClosed) {
			a.log.Debug("close", "err", err)
		}
	}
}
