package broker

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/pgward/pgward/broker/secrets"
)

// Options are what New needs. Config must be valid; the rest default to
// doing nothing (NopObserver, a discarding logger) except Resolver and
// Secrets, which are required. The Observer is where a session's telemetry
// goes (audit, metrics, traces, lifecycle log lines); Logger gets only
// operational lines (a malformed message, a lease that ended, a reload).
type Options struct {
	Config   Config
	Resolver IdentityResolver
	Secrets  secrets.Source
	Observer Observer
	Logger   *slog.Logger
}

// Server accepts client connections and runs their sessions.
type Server struct {
	resolver IdentityResolver
	secrets  secrets.Source
	obs      Observer
	log      *slog.Logger

	state atomic.Pointer[serverState] // swapped by Reload

	mu        sync.Mutex
	listeners map[net.Listener]struct{}
	sessions  map[*session]struct{}
	closing   bool
	conns     atomic.Int64 // accepted connections not yet closed
	wg        sync.WaitGroup

	cancels cancelMap
	limiter *limiter
	slots   slotTable      // login slots per uid and cgroup (slots.go)
	slotLog slotLogLimiter // rate-limits the WARN of slot refusals
	// refusing counts slot refusals waiting for the client's startup packet
	// (at most politeRefusals; the others are answered at once).
	refusing atomic.Int32
	roles    roleCache    // what each credential's role can become (roles.go)
	reuse    reusePool    // parked upstream connections (upstreams.<name>.reuse)
	budget   bufferBudget // limits.buffer_memory, shared by every session's relay
}

// serverState is the part of the server a reload replaces.
type serverState struct {
	cfg       Config
	policy    *Policy
	upstreams map[string]*upstream
}

// New checks the configuration and builds a Server. It opens nothing.
func New(opts Options) (*Server, error) {
	if opts.Resolver == nil {
		return nil, errors.New("broker: an IdentityResolver is required")
	}
	if opts.Secrets == nil {
		return nil, errors.New("broker: a secrets Source is required")
	}
	st, err := newState(opts.Config)
	if err != nil {
		return nil, err
	}
	s := &Server{
		resolver:  opts.Resolver,
		secrets:   opts.Secrets,
		obs:       opts.Observer,
		log:       opts.Logger,
		listeners: map[net.Listener]struct{}{},
		sessions:  map[*session]struct{}{},
		cancels:   cancelMap{m: map[cancelKey]*session{}},
	}
	if s.obs == nil {
		s.obs = NopObserver{}
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	s.limiter = newLimiter(opts.Config.Limits)
	s.budget.setLimits(&opts.Config)
	for _, d := range opts.Config.Deprecations() {
		s.log.Warn(d)
	}
	warnTrust(s.log, opts.Config)
	s.state.Store(st)
	return s, nil
}

func newState(cfg Config) (*serverState, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	st := &serverState{cfg: cfg, policy: NewPolicy(cfg.Principals, cfg.Grants), upstreams: map[string]*upstream{}}
	var errs []error
	for name, uc := range cfg.Upstreams {
		u, err := newUpstream(name, uc)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		st.upstreams[name] = u
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return st, nil
}

// CheckUpstreams reports, as *FieldError, every upstream whose TLS files
// New would fail to load (a missing CA file, one without a certificate, a
// client key pair that does not load). It is what `pgward check-config`
// runs; it changes nothing.
func CheckUpstreams(cfg Config) error {
	var errs []error
	for _, name := range sortedKeys(cfg.Upstreams) {
		if _, err := newUpstream(name, cfg.Upstreams[name]); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Reload replaces the policy and upstreams. Sessions whose grant no longer
// holds are ended with reason "grant_revoked" (a running statement is
// cancelled upstream first, see endsession.go); the others are untouched. An
// invalid config changes nothing and returns every problem.
func (s *Server) Reload(cfg Config) error {
	st, err := newState(cfg)
	if err != nil {
		return err
	}
	s.state.Store(st)
	warnTrust(s.log, cfg)
	s.limiter.setConfig(cfg.Limits)
	// Role memberships are learned again at each credential's next use.
	s.roles.clear()
	s.budget.setLimits(&cfg)
	for _, d := range cfg.Deprecations() {
		s.log.Warn(d)
	}
	s.mu.Lock()
	var revoked []*session
	for sess := range s.sessions {
		d := st.policy.Authorize(sess.info.Identity, sess.info.Upstream, sess.info.User, sess.claim)
		if !d.Allowed {
			revoked = append(revoked, sess)
		}
	}
	s.mu.Unlock()
	for _, sess := range revoked {
		sess.end(EndGrantRevoked, CodeInvalidAuthorization, "pgward ended this session: the policy no longer grants this role to this process",
			"grant revoked by reload")
	}
	return nil
}

// Config returns the running configuration.
func (s *Server) Config() Config { return s.state.Load().cfg }

// ListenUnix creates the node socket <unix_dir>/.s.PGSQL.<port> with the
// configured mode. A socket file left by a dead pgward is removed; one that
// answers is in use and is an error.
func ListenUnix(cfg ListenConfig) (*net.UnixListener, error) {
	path := cfg.SocketPath()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("create socket directory: %w", err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("%s exists and is not a socket: remove it or choose another listen.unix_dir", path)
		}
		c, err := net.DialTimeout("unix", path, time.Second)
		if err == nil {
			c.Close()
			return nil, fmt.Errorf("%s is in use by a live server: is another pgward running?", path)
		}
		if !errors.Is(err, syscall.ECONNREFUSED) && !errors.Is(err, syscall.ENOENT) {
			return nil, fmt.Errorf("check socket %s: %w", path, err)
		}
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("remove stale socket %s: %w", path, err)
		}
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	ln.SetUnlinkOnClose(true)
	if err := os.Chmod(path, os.FileMode(cfg.FileMode())); err != nil {
		ln.Close()
		return nil, fmt.Errorf("chmod %s: %w", path, err)
	}
	return ln, nil
}

// Serve accepts connections on ln until ctx ends, Shutdown or Close is
// called, or accepting fails. It closes ln when it returns.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		ln.Close()
		return ErrServerClosed
	}
	s.listeners[ln] = struct{}{}
	s.mu.Unlock()
	if s.state.Load().cfg.Listen.EventLoop {
		// Started before the first session, so that its two descriptors
		// are the agent's own from the start (eventloop.go).
		lc := s.state.Load().cfg.Listen
		if err := startLoops(lc.EventLoopThreads); err != nil {
			s.log.Warn("event loop unavailable; sessions relay with goroutines", "err", err)
		} else if err := setLoopsNice(lc.EventLoopNice); err != nil {
			s.log.Warn("listen.event_loop_nice not applied; the event loops run at the process's priority: give pgward CAP_SYS_NICE, or an RLIMIT_NICE that allows it (systemd: LimitNICE=)", "nice", lc.EventLoopNice, "err", err)
		}
	}
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, ln)
		s.mu.Unlock()
		ln.Close()
	}()
	var delay time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			s.mu.Lock()
			closing := s.closing
			s.mu.Unlock()
			if closing || ctx.Err() != nil {
				return ErrServerClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
				// Out of descriptors: back off rather than spin.
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				s.log.Warn("accept failed; backing off", "err", err, "delay", delay)
				time.Sleep(delay)
				continue
			}
			return fmt.Errorf("accept: %w", err)
		}
		delay = 0
		// Add under the lock that Shutdown sets closing with, so no Add
		// races a Wait that may already have seen zero.
		s.mu.Lock()
		if s.closing {
			s.mu.Unlock()
			c.Close()
			return ErrServerClosed
		}
		s.wg.Add(1)
		s.mu.Unlock()
		n := s.conns.Add(1)
		go func() {
			defer s.wg.Done()
			release, refusal := s.admitConn(ctx, c, n)
			if refusal != nil {
				// A refused connection gives its slot back at once, so
				// refusals answered slowly cannot fill the slots.
				s.conns.Add(-1)
				s.answerRefusal(c, refusal)
				c.Close()
				return
			}
			defer s.conns.Add(-1)
			defer release()
			s.handle(withLoginSlot(ctx, release), c)
		}()
	}
}

// ErrServerClosed is returned by Serve after Shutdown or Close.
var ErrServerClosed = errors.New("broker: server closed")

// Shutdown stops accepting, then waits for sessions to end until ctx is
// done; the sessions still open then are ended with reason "shutdown"
// (each with its audit record). It returns when every connection is closed.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.closing = true
	for ln := range s.listeners {
		ln.Close()
	}
	s.mu.Unlock()
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
		s.reuse.closeAll()
		return nil
	case <-ctx.Done():
	}
	s.terminateAll(EndShutdown)
	<-done
	s.reuse.closeAll()
	return ctx.Err()
}

// Close ends every session at once and stops accepting. It is idempotent.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closing = true
	for ln := range s.listeners {
		ln.Close()
	}
	s.mu.Unlock()
	s.terminateAll(EndShutdown)
	s.wg.Wait()
	s.reuse.closeAll()
	return nil
}

func (s *Server) terminateAll(reason EndReason) {
	s.mu.Lock()
	all := make([]*session, 0, len(s.sessions))
	for sess := range s.sessions {
		all = append(all, sess)
	}
	s.mu.Unlock()
	for _, sess := range all {
		sess.end(reason, CodeAdminShutdown, "pgward is shutting down; reconnect to continue", "")
	}
}

// Draining reports whether Shutdown or Close was called.
func (s *Server) Draining() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closing
}

// ActiveSessions is the number of relaying sessions.
func (s *Server) ActiveSessions() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.sessions)
}

func (s *Server) addSession(sess *session) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing {
		return false
	}
	s.sessions[sess] = struct{}{}
	return true
}

func (s *Server) removeSession(sess *session) {
	s.mu.Lock()
	delete(s.sessions, sess)
	s.mu.Unlock()
}

func newUUID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	var out [36]byte
	hex.Encode(out[0:8], b[0:4])
	out[8] = '-'
	hex.Encode(out[9:13], b[4:6])
	out[13] = '-'
	hex.Encode(out[14:18], b[6:8])
	out[18] = '-'
	hex.Encode(out[19:23], b[8:10])
	out[23] = '-'
	hex.Encode(out[24:], b[10:])
	return string(out[:])
}
