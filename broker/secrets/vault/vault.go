package vault

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/pgward/pgward/broker/secrets"
)

// Source is a secrets.Source backed by HashiCorp Vault. It is safe for
// concurrent use. Create it with New and Close it when done.
type Source struct {
	cfg     Config
	log     *slog.Logger
	client  *api.Client
	auth    *authenticator
	flights flightGroup
	closing chan struct{}
	bg      context.Context // canceled by Close, after revocations
	stopBg  context.CancelFunc
	wg      sync.WaitGroup // background goroutines: auth loop, watchers, flights
	once    sync.Once

	mu     sync.Mutex
	closed bool
	static map[key]staticEntry
	leases map[key]*leaseEntry      // the current lease per key
	live   map[*leaseEntry]struct{} // every lease not yet ended, superseded ones too
	certs  map[key]*certEntry       // PKI client certificates (pki.go)

	certObs func(CertEvent) // WithCertObserver; set by New only
}

type key struct{ upstream, role string }

type staticEntry struct {
	user     string
	password secrets.Secret
	expires  time.Time
}

var _ secrets.Source = (*Source)(nil)

// New validates cfg, builds the Vault client and logs in. When Vault cannot
// be reached (down, sealed, timing out) New still succeeds: it logs a warning
// and keeps trying to log in, and fetches fail with ErrUnavailable meanwhile.
// A refused login (ErrDenied) or a missing or unreadable credential file is
// an error.
// log may be nil.
func New(cfg Config, log *slog.Logger, opts ...Option) (*Source, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("vault config: %w", err)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("secrets_backend", "vault")
	client, err := newClient(cfg)
	if err != nil {
		return nil, err
	}
	loginClient, err := newClient(cfg)
	if err != nil {
		return nil, err
	}
	s := &Source{
		cfg:     cfg,
		log:     log,
		client:  client,
		closing: make(chan struct{}),
		static:  map[key]staticEntry{},
		leases:  map[key]*leaseEntry{},
		live:    map[*leaseEntry]struct{}{},
		certs:   map[key]*certEntry{},
	}
	for _, o := range opts {
		o(s)
	}
	s.bg, s.stopBg = context.WithCancel(context.Background())
	s.flights.track, s.flights.done = s.track, s.wg.Done
	s.auth = &authenticator{
		cfg:     cfg.Auth,
		client:  client,
		login:   loginClient,
		timeout: cfg.timeout(),
		log:     log,
		wake:    make(chan struct{}, 1),
	}
	s.auth.flights.track, s.auth.flights.done = s.track, s.wg.Done

	ctx, cancel := context.WithTimeout(context.Background(), cfg.timeout())
	err = s.auth.relogin(ctx, 0)
	cancel()
	if err != nil && (!errors.Is(err, secrets.ErrUnavailable) || errors.Is(err, fs.ErrNotExist) || errors.Is(err, fs.ErrPermission)) {
		s.stopBg()
		s.wg.Wait()
		return nil, err
	}
	if err != nil {
		log.Warn("vault login failed at start; will retry", "address", cfg.Address, "error", err)
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		s.auth.run(s.closing)
	}()
	return s, nil
}

// newClient builds a Vault API client from cfg alone: the VAULT_*
// environment variables the library would otherwise read (token, namespace,
// TLS settings, retries) do not apply.
func newClient(cfg Config) (*api.Client, error) {
	tlsConf := &tls.Config{MinVersion: tls.VersionTLS12}
	if cfg.CAFile != "" {
		pem, err := os.ReadFile(cfg.CAFile)
		if err != nil {
			return nil, fmt.Errorf("vault ca_file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("vault ca_file %s: no PEM certificate found", cfg.CAFile)
		}
		tlsConf.RootCAs = pool
	}
	transport := &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           (&net.Dialer{Timeout: cfg.timeout(), KeepAlive: 30 * time.Second}).DialContext,
		TLSClientConfig:       tlsConf,
		TLSHandshakeTimeout:   cfg.timeout(),
		ResponseHeaderTimeout: cfg.timeout(),
		MaxIdleConns:          16,
		MaxIdleConnsPerHost:   16,
		IdleConnTimeout:       90 * time.Second,
		ForceAttemptHTTP2:     true,
	}
	c, err := api.NewClient(&api.Config{
		Address: strings.TrimRight(cfg.Address, "/"),
		HttpClient: &http.Client{
			Transport: transport,
			// The Vault client follows Vault's redirects itself.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		},
		Timeout:      cfg.timeout(),
		MaxRetries:   1,
		MinRetryWait: 50 * time.Millisecond,
		MaxRetryWait: 250 * time.Millisecond,
	})
	if err != nil {
		return nil, fmt.Errorf("vault client: %w", err)
	}
	c.ClearToken()
	c.ClearNamespace()
	return c, nil
}

// Fetch returns the credential for role on upstream, as the roles section of
// the configuration maps it. A static (KV) credential is served from a cache
// for cache_ttl. A dynamic (database) credential is shared by the sessions
// that fetch it while its lease is current; each must call Lease.Release once
// when it ends. Errors wrap secrets.ErrUnavailable, ErrDenied or ErrNotFound
// (see Error) and never hold a secret.
func (s *Source) Fetch(ctx context.Context, upstream, role string) (secrets.Credential, error) {
	rc, ok := s.cfg.Roles[upstream][role]
	if !ok {
		return secrets.Credential{}, &Error{Op: "fetch", Detail: fmt.Sprintf("no vault mapping for role %q on upstream %q", role, upstream),
			Kind: secrets.ErrNotFound}
	}
	s.mu.Lock()
	closed := s.closed
	s.mu.Unlock()
	if closed {
		return secrets.Credential{}, errClosed
	}
	k := key{upstream, role}
	if rc.KV != nil {
		return s.fetchKV(ctx, k, *rc.KV)
	}
	if rc.PKI != nil {
		return s.fetchPKI(ctx, k, *rc.PKI)
	}
	return s.fetchDatabase(ctx, k, *rc.Database)
}

func (s *Source) fetchKV(ctx context.Context, k key, kc KVConfig) (secrets.Credential, error) {
	s.mu.Lock()
	e, ok := s.static[k]
	s.mu.Unlock()
	if ok && time.Now().Before(e.expires) {
		return secrets.Credential{User: e.user, Password: e.password}, nil
	}
	path := kc.mount() + "/data/" + strings.Trim(kc.Path, "/")
	if kc.Version > 0 {
		path += fmt.Sprintf("?version=%d", kc.Version)
	}
	v, err := s.flights.do(ctx, "kv\x00"+k.upstream+"\x00"+k.role, func() (any, error) {
		return s.readKV(k, kc, path)
	})
	if err != nil {
		return secrets.Credential{}, s.fail(k, classify("read kv", path, err))
	}
	e = v.(staticEntry)
	return secrets.Credential{User: e.user, Password: e.password}, nil
}

func (s *Source) readKV(k key, kc KVConfig, path string) (staticEntry, error) {
	ctx, cancel := s.requestContext()
	defer cancel()
	var sec *api.KVSecret
	err := s.call(ctx, func(ctx context.Context) (err error) {
		kv := s.client.KVv2(kc.mount())
		if kc.Version > 0 {
			sec, err = kv.GetVersion(ctx, strings.Trim(kc.Path, "/"), kc.Version)
		} else {
			sec, err = kv.Get(ctx, strings.Trim(kc.Path, "/"))
		}
		return err
	})
	if err != nil {
		return staticEntry{}, classify("read kv", path, err)
	}
	notFound := func(detail string) (staticEntry, error) {
		return staticEntry{}, &Error{Op: "read kv", Path: path, Detail: detail, Kind: secrets.ErrNotFound}
	}
	if sec == nil || sec.Data == nil {
		return notFound("secret version is deleted or destroyed")
	}
	pw, ok := sec.Data[kc.field()].(string)
	switch {
	case !ok && sec.Data[kc.field()] == nil:
		return notFound(fmt.Sprintf("secret has no field %q", kc.field()))
	case !ok:
		return notFound(fmt.Sprintf("field %q is not a string", kc.field()))
	case pw == "":
		return notFound(fmt.Sprintf("field %q is empty", kc.field()))
	}
	e := staticEntry{password: secrets.NewSecret(pw), expires: time.Now().Add(s.cfg.cacheTTL())}
	if kc.UserField != "" {
		u, _ := sec.Data[kc.UserField].(string)
		if u == "" {
			return notFound(fmt.Sprintf("secret has no string field %q", kc.UserField))
		}
		e.user = u
	}
	s.mu.Lock()
	s.static[k] = e
	s.mu.Unlock()
	version := 0
	if sec.VersionMetadata != nil {
		version = sec.VersionMetadata.Version
	}
	s.log.Debug("vault kv secret read", "upstream", k.upstream, "role", k.role, "path", path, "version", version)
	return e, nil
}

func (s *Source) fetchDatabase(ctx context.Context, k key, dc DatabaseConfig) (secrets.Credential, error) {
	path := dc.mount() + "/creds/" + dc.role(k.role)
	for range 3 {
		s.mu.Lock()
		if e := s.leases[k]; e != nil && e.reusable(time.Now()) {
			cred := s.acquire(e)
			s.mu.Unlock()
			return cred, nil
		}
		s.mu.Unlock()
		v, err := s.flights.do(ctx, "db\x00"+k.upstream+"\x00"+k.role, func() (any, error) {
			return s.issue(k, path)
		})
		if err != nil {
			return secrets.Credential{}, s.fail(k, classify("issue database credentials", path, err))
		}
		e := v.(*leaseEntry)
		s.mu.Lock()
		if !e.ended {
			cred := s.acquire(e)
			s.mu.Unlock()
			return cred, nil
		}
		s.mu.Unlock()
	}
	return secrets.Credential{}, &Error{Op: "issue database credentials", Path: path,
		Detail: "new credentials ended before use", Kind: secrets.ErrUnavailable}
}

// issue asks Vault for new database credentials and starts watching their
// lease.
func (s *Source) issue(k key, path string) (*leaseEntry, error) {
	ctx, cancel := s.requestContext()
	defer cancel()
	var sec *api.Secret
	err := s.call(ctx, func(ctx context.Context) (err error) {
		sec, err = s.client.Logical().ReadWithContext(ctx, path)
		return err
	})
	if err != nil {
		return nil, classify("issue database credentials", path, err)
	}
	if sec == nil {
		return nil, &Error{Op: "issue database credentials", Path: path, Detail: "no such role or mount", Kind: secrets.ErrNotFound}
	}
	user, _ := sec.Data["username"].(string)
	pw, _ := sec.Data["password"].(string)
	if user == "" || pw == "" || sec.LeaseID == "" || sec.LeaseDuration <= 0 {
		if sec.LeaseID != "" {
			s.revokeID(sec.LeaseID)
		}
		return nil, &Error{Op: "issue database credentials", Path: path,
			Detail: "answer lacks username, password or lease", Kind: secrets.ErrNotFound}
	}
	ttl := time.Duration(sec.LeaseDuration) * time.Second
	e := &leaseEntry{
		key:      k,
		id:       sec.LeaseID,
		user:     user,
		password: secrets.NewSecret(pw),
		done:     make(chan struct{}),
		stop:     make(chan struct{}),
		ttl0:     ttl,
		expires:  time.Now().Add(ttl),
		noRenew:  !sec.Renewable,
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		s.revokeID(sec.LeaseID)
		return nil, &Error{Op: "issue database credentials", Path: path, Detail: "source is closed", Kind: secrets.ErrUnavailable}
	}
	if old := s.leases[k]; old != nil {
		// The old lease stays with the sessions using it; new sessions get e.
		s.log.Debug("vault lease superseded", "lease_id", old.id, "upstream", k.upstream, "role", k.role)
	}
	s.leases[k] = e
	s.live[e] = struct{}{}
	// Until the callers waiting on this fetch acquire it, it is unused: give
	// them at least a request timeout to do so.
	s.startLinger(e, max(s.cfg.leaseLinger(), s.cfg.timeout()))
	s.wg.Add(1)
	s.mu.Unlock()
	go s.watch(e)
	s.log.Info("vault database credentials issued", "lease_id", e.id, "upstream", k.upstream, "role", k.role,
		"path", path, "user", user, "ttl", ttl.String(), "renewable", sec.Renewable)
	return e, nil
}

// Invalidate drops the cached static (KV) credential of role on upstream, so
// the next Fetch reads Vault again: for a caller whose login with it was just
// refused because the password was rotated. Dynamic credentials are not
// affected. Other sessions' fetches in flight are not interrupted.
func (s *Source) Invalidate(upstream, role string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.static, key{upstream, role})
}

// revokeID revokes a lease pgward will not use (best effort, bounded).
func (s *Source) revokeID(id string) {
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.timeout())
	defer cancel()
	if err := s.call(ctx, func(ctx context.Context) error { return s.client.Sys().RevokeWithContext(ctx, id) }); err != nil {
		s.log.Warn("vault lease revoke failed; Vault will expire it", "lease_id", id, "error", classify("revoke lease", "sys/leases/revoke", err))
	}
}

// call runs fn with a token, logging in first if needed, and once more after
// a fresh login when Vault answered 403 (the token may have expired or been
// revoked).
func (s *Source) call(ctx context.Context, fn func(ctx context.Context) error) error {
	if err := s.auth.ensure(ctx); err != nil {
		return err
	}
	gen := s.auth.generation()
	err := fn(ctx)
	var re *api.ResponseError
	if err == nil || !errors.As(err, &re) || re.StatusCode != http.StatusForbidden || !s.auth.shouldRelogin(gen) {
		return err
	}
	s.log.Info("vault answered permission denied; logging in again", "method", s.cfg.Auth.Method)
	if lerr := s.auth.relogin(ctx, gen); lerr != nil {
		return err
	}
	return fn(ctx)
}

// errClosed is returned by operations started after Close.
var errClosed = &Error{Op: "fetch", Detail: "source is closed", Kind: secrets.ErrUnavailable}

// track registers a background goroutine with s.wg unless s is closed. The
// check and the Add happen under s.mu, which Close takes to set closed
// before it waits, so no Add races the Wait.
func (s *Source) track() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.wg.Add(1)
	return true
}

// requestContext bounds one background Vault operation; Close cancels it.
func (s *Source) requestContext() (context.Context, context.CancelFunc) {
	return context.WithTimeout(s.bg, s.cfg.timeout())
}

// fail logs a failed fetch at the right level and returns err.
func (s *Source) fail(k key, err *Error) error {
	level := slog.LevelWarn
	if errors.Is(err, context.Canceled) {
		level = slog.LevelDebug
	}
	s.log.Log(context.Background(), level, "vault fetch failed", "upstream", k.upstream, "role", k.role, "error", err)
	return err
}

func slogLevelFor(reason string, sessions int) slog.Level {
	if sessions > 0 && reason == ReasonRevoked {
		return slog.LevelWarn
	}
	if sessions > 0 {
		return slog.LevelInfo
	}
	return slog.LevelDebug
}

// Close stops renewing, revokes every dynamic credential pgward holds (their
// Done channels close with reason lease_revoked), and waits for its
// goroutines. Fetch fails with ErrUnavailable afterwards. It is idempotent.
//
// Because Close revokes held leases, an agent that reloads its configuration
// should keep the Source when the vault section did not change.
func (s *Source) Close() {
	s.once.Do(func() {
		s.mu.Lock()
		s.closed = true
		held := make([]*leaseEntry, 0, len(s.live))
		for e := range s.live {
			held = append(held, e)
		}
		s.mu.Unlock()
		var wg sync.WaitGroup
		for _, e := range held {
			wg.Add(1)
			go func() {
				defer wg.Done()
				s.revoke(e, "closing")
			}()
		}
		wg.Wait()
		s.stopCertTimers()
		close(s.closing)
		s.stopBg()
		s.wg.Wait()
	})
}
