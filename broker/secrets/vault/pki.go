package vault

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/pgward/pgward/broker/secrets"
)

// PKIConfig names a role of Vault's PKI secrets engine that issues the
// client certificate pgward presents to an upstream with auth [cert].
type PKIConfig struct {
	// Mount is the engine's mount path (default "pki").
	Mount string `yaml:"mount"`
	// Role is the engine's role: pgward writes to <mount>/issue/<role>
	// (default: the pgward role's name).
	Role string `yaml:"role"`
	// CommonName is the certificate's CN, which PostgreSQL's cert
	// authentication maps to the login role (default: the pgward role's
	// name; set it only with a pg_ident.conf map on the server).
	CommonName string `yaml:"common_name"`
	// TTL is the lifetime asked for (default: the Vault role's ttl). Vault
	// caps it at the role's max_ttl.
	TTL time.Duration `yaml:"ttl"`
}

// DefaultPKIMount is roles.<upstream>.<role>.pki.mount when unset.
const DefaultPKIMount = "pki"

func (p PKIConfig) mount() string {
	if p.Mount != "" {
		return strings.Trim(p.Mount, "/")
	}
	return DefaultPKIMount
}

func (p PKIConfig) role(pgwardRole string) string {
	if p.Role != "" {
		return p.Role
	}
	return pgwardRole
}

func (p PKIConfig) commonName(pgwardRole string) string {
	if p.CommonName != "" {
		return p.CommonName
	}
	return pgwardRole
}

func (p PKIConfig) validate(key string, bad func(key, format string, args ...any)) {
	if p.TTL < 0 || (p.TTL > 0 && p.TTL < time.Second) {
		bad(key+".ttl", "must be at least 1s")
	}
	if strings.Contains(strings.Trim(p.Role, "/"), "/") {
		bad(key+".role", "%q: give the PKI role's name, not a path", p.Role)
	}
}

// A certificate is renewed when renewFraction of its lifetime (from when
// pgward received it to its NotAfter) has passed: a third of it remains
// (8 h of a 24 h certificate, 20 s of a 1 min one). A certificate that
// expires within handoutMargin is not handed to a new session.
const (
	renewFraction = 2.0 / 3
	handoutMargin = time.Second
	renewRetryMax = 30 * time.Second
)

// CertEvent is what a Source reports (WithCertObserver) about the client
// certificates Vault's PKI engine issues it: one issued at a fetch, and
// each scheduled renewal, whether it worked or not.
type CertEvent struct {
	Upstream, Role string
	// Renewal is set for a renewal before expiry (the first attempt or a
	// retry); unset for a certificate issued because a session needed one
	// and none was current.
	Renewal bool
	// Err is why a renewal failed; nil when a certificate was issued.
	Err error
	// NotAfter is when the certificate current after the event expires.
	NotAfter time.Time
}

// Option configures New.
type Option func(*Source)

// WithCertObserver has f called (from the goroutine that issued or renewed,
// never with Source's lock held) with each CertEvent.
func WithCertObserver(f func(CertEvent)) Option {
	return func(s *Source) { s.certObs = f }
}

func (s *Source) certEvent(ev CertEvent) {
	if s.certObs != nil {
		s.certObs(ev)
	}
}

// certEntry is the current client certificate of one (upstream, role).
type certEntry struct {
	cert     *secrets.ClientCert
	received time.Time
	renewAt  time.Time
	used     bool          // handed out since it was received
	retry    time.Duration // backoff after a failed renewal
	timer    *time.Timer
}

// fetchPKI returns the cached certificate of k while it is usable, and
// otherwise asks Vault for one. A renewal that failed until the
// certificate expired makes the fetch fail (ErrUnavailable), so new
// sessions are refused; sessions already established are not affected (the
// certificate is checked only in the TLS handshake).
func (s *Source) fetchPKI(ctx context.Context, k key, pc PKIConfig) (secrets.Credential, error) {
	now := time.Now()
	s.mu.Lock()
	e := s.certs[k]
	if e != nil && now.Add(handoutMargin).Before(e.cert.NotAfter) {
		e.used = true
		s.mu.Unlock()
		return secrets.Credential{User: k.role, Cert: e.cert}, nil
	}
	s.mu.Unlock()
	path := pc.mount() + "/issue/" + pc.role(k.role)
	v, err := s.flights.do(ctx, "pki\x00"+k.upstream+"\x00"+k.role, func() (any, error) {
		return s.issueCert(k, pc, path)
	})
	if err != nil {
		ve := classify("issue certificate", path, err)
		if e != nil {
			ve = &Error{Op: ve.Op, Path: ve.Path, Status: ve.Status, Kind: ve.Kind, cause: errors.Join(secrets.ErrCertExpired, ve),
				Detail: fmt.Sprintf("the client certificate expired at %s and Vault could not issue a new one (%s)",
					e.cert.NotAfter.UTC().Format(time.RFC3339), ve.Detail)}
		}
		return secrets.Credential{}, s.fail(k, ve)
	}
	e = v.(*certEntry)
	s.mu.Lock()
	e.used = true
	s.mu.Unlock()
	s.certEvent(CertEvent{Upstream: k.upstream, Role: k.role, NotAfter: e.cert.NotAfter})
	return secrets.Credential{User: k.role, Cert: e.cert}, nil
}

// issueCert asks Vault for a certificate (pki/issue/<role>) and makes it
// the current one of k, scheduling its renewal.
func (s *Source) issueCert(k key, pc PKIConfig, path string) (*certEntry, error) {
	ctx, cancel := s.requestContext()
	defer cancel()
	data := map[string]any{"common_name": pc.commonName(k.role), "format": "pem"}
	if pc.TTL > 0 {
		data["ttl"] = fmt.Sprintf("%ds", int(pc.TTL/time.Second))
	}
	var sec *api.Secret
	err := s.call(ctx, func(ctx context.Context) (err error) {
		sec, err = s.client.Logical().WriteWithContext(ctx, path, data)
		return err
	})
	if err != nil {
		return nil, classify("issue certificate", path, err)
	}
	bad := func(detail string) (*certEntry, error) {
		return nil, &Error{Op: "issue certificate", Path: path, Detail: detail, Kind: secrets.ErrNotFound}
	}
	if sec == nil || sec.Data == nil {
		return bad("empty answer: no such role or mount")
	}
	certPEM, _ := sec.Data["certificate"].(string)
	keyPEM, _ := sec.Data["private_key"].(string)
	if certPEM == "" || keyPEM == "" {
		return bad("answer lacks certificate or private_key")
	}
	// The chain behind the leaf, for a server that trusts only the root.
	chain := []string{strings.TrimSpace(certPEM)}
	if cas, ok := sec.Data["ca_chain"].([]any); ok {
		for _, c := range cas {
			if c, ok := c.(string); ok && c != "" {
				chain = append(chain, strings.TrimSpace(c))
			}
		}
	} else if ca, ok := sec.Data["issuing_ca"].(string); ok && ca != "" {
		chain = append(chain, strings.TrimSpace(ca))
	}
	cc, err := secrets.ParseClientCert([]byte(strings.Join(chain, "\n")+"\n"), []byte(keyPEM))
	if err != nil {
		return bad(err.Error())
	}
	now := time.Now()
	if !now.Before(cc.NotAfter) {
		return bad("Vault issued a certificate that is already expired")
	}
	e := &certEntry{cert: cc, received: now,
		renewAt: now.Add(time.Duration(float64(cc.NotAfter.Sub(now)) * renewFraction))}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil, &Error{Op: "issue certificate", Path: path, Detail: "source is closed", Kind: secrets.ErrUnavailable}
	}
	old := s.certs[k]
	if old != nil && old.timer != nil {
		old.timer.Stop()
	}
	s.certs[k] = e
	s.scheduleRenewal(k, pc, e, time.Until(e.renewAt))
	s.mu.Unlock()
	msg := "vault pki certificate issued"
	if old != nil {
		msg = "vault pki certificate renewed"
	}
	s.log.Info(msg, "upstream", k.upstream, "role", k.role, "path", path, "cn", cc.CommonName,
		"serial", cc.Serial, "not_after", cc.NotAfter.UTC().Format(time.RFC3339),
		"renew_at", e.renewAt.UTC().Format(time.RFC3339))
	return e, nil
}

// scheduleRenewal arms e's timer. s.mu is held.
func (s *Source) scheduleRenewal(k key, pc PKIConfig, e *certEntry, d time.Duration) {
	e.timer = time.AfterFunc(max(d, 0), func() { s.renewCert(k, pc, e) })
}

// renewCert replaces e before it expires, if it was used since it was
// received (a certificate nobody asked for is left to lapse; the next
// fetch issues a new one). A failure is retried with backoff until the
// certificate expires, then logged at ERROR: new sessions are refused
// until Vault issues one again.
func (s *Source) renewCert(k key, pc PKIConfig, e *certEntry) {
	if !s.track() {
		return
	}
	defer s.wg.Done()
	s.mu.Lock()
	current, used := s.certs[k] == e, e.used
	s.mu.Unlock()
	if !current {
		return
	}
	if !used {
		s.log.Debug("vault pki certificate unused; not renewing it", "upstream", k.upstream, "role", k.role, "serial", e.cert.Serial)
		return
	}
	path := pc.mount() + "/issue/" + pc.role(k.role)
	v, err := s.flights.do(s.bg, "pki\x00"+k.upstream+"\x00"+k.role, func() (any, error) {
		return s.issueCert(k, pc, path)
	})
	if errors.Is(err, context.Canceled) {
		return
	}
	if err == nil {
		s.certEvent(CertEvent{Upstream: k.upstream, Role: k.role, Renewal: true, NotAfter: v.(*certEntry).cert.NotAfter})
		return
	}
	s.certEvent(CertEvent{Upstream: k.upstream, Role: k.role, Renewal: true, Err: err, NotAfter: e.cert.NotAfter})
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || s.certs[k] != e {
		return
	}
	e.retry = min(max(2*e.retry, time.Second), renewRetryMax)
	left := time.Until(e.cert.NotAfter)
	if left <= 0 {
		s.log.Error("vault pki certificate expired and could not be renewed: new sessions for this role are refused until Vault issues one (open sessions continue)",
			"upstream", k.upstream, "role", k.role, "serial", e.cert.Serial, "error", classify("issue certificate", path, err))
		return
	}
	s.log.Warn("vault pki certificate renewal failed; will retry", "upstream", k.upstream, "role", k.role,
		"serial", e.cert.Serial, "expires_in", left.Round(time.Second).String(), "retry_in", min(e.retry, left).String(),
		"error", classify("issue certificate", path, err))
	s.scheduleRenewal(k, pc, e, min(e.retry, left))
}

// stopCertTimers stops every renewal; Close calls it.
func (s *Source) stopCertTimers() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, e := range s.certs {
		if e.timer != nil {
			e.timer.Stop()
		}
	}
}
