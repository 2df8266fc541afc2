package vault

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/pgward/pgward/broker/secrets"
)

// Reasons a dynamic credential's Lease.Done is closed.
const (
	ReasonExpired = "lease_expired" // the lease reached its end (TTL or max TTL)
	ReasonRevoked = "lease_revoked" // revoked in Vault, or by pgward when unused or closing
)

// leaseEntry is one dynamic credential shared by every session that fetched
// it while it was current. Fields marked (s.mu) are guarded by Source.mu.
type leaseEntry struct {
	key      key
	id       string
	user     string
	password secrets.Secret
	done     chan struct{} // closed once, by end
	stop     chan struct{} // closed with done: stops the watcher
	ttl0     time.Duration // lease duration at issue

	refs      int         // (s.mu) sessions holding it
	ended     bool        // (s.mu)
	reason    string      // (s.mu)
	expires   time.Time   // (s.mu)
	capped    bool        // (s.mu) renewals no longer extend it
	linger    *time.Timer // (s.mu)
	noRenew   bool        // (s.mu) Vault issued it non-renewable
	lingerGen int         // (s.mu) invalidates stale linger timers
}

// reusable reports whether a new session may still be given this lease
// (s.mu held): not ended, and not about to end.
func (e *leaseEntry) reusable(now time.Time) bool {
	if e.ended {
		return false
	}
	left := e.expires.Sub(now)
	if left <= 0 {
		return false
	}
	if !e.capped && !e.noRenew {
		return true
	}
	return left > e.ttl0/3
}

// credential hands out the lease to one more session (s.mu held).
func (s *Source) acquire(e *leaseEntry) secrets.Credential {
	e.refs++
	e.lingerGen++
	if e.linger != nil {
		e.linger.Stop()
		e.linger = nil
	}
	var once sync.Once
	return secrets.Credential{
		User:     e.user,
		Password: e.password,
		Lease: &secrets.Lease{
			ID:   e.id,
			Done: e.done,
			Reason: func() string {
				s.mu.Lock()
				defer s.mu.Unlock()
				return e.reason
			},
			Release: func() { once.Do(func() { s.release(e) }) },
		},
	}
}

func (s *Source) release(e *leaseEntry) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e.refs--
	if e.refs > 0 || e.ended {
		return
	}
	s.startLinger(e, s.cfg.leaseLinger())
}

// startLinger revokes e after d unless a session takes it first (s.mu held).
func (s *Source) startLinger(e *leaseEntry, d time.Duration) {
	e.lingerGen++
	gen := e.lingerGen
	if e.linger != nil {
		e.linger.Stop()
	}
	e.linger = time.AfterFunc(d, func() {
		s.mu.Lock()
		if e.ended || e.refs > 0 || e.lingerGen != gen || s.closed {
			s.mu.Unlock()
			return
		}
		s.wg.Add(1) // under s.mu, not closed: see track
		s.mu.Unlock()
		defer s.wg.Done()
		s.revoke(e, "unused")
	})
}

// revoke revokes e in Vault (best effort, bounded) and ends it.
func (s *Source) revoke(e *leaseEntry, why string) {
	if !s.end(e, ReasonRevoked) {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.timeout())
	defer cancel()
	err := s.call(ctx, func(ctx context.Context) error {
		return s.client.Sys().RevokeWithContext(ctx, e.id)
	})
	if err != nil {
		s.log.Warn("vault lease revoke failed; Vault will expire it", "lease_id", e.id,
			"upstream", e.key.upstream, "role", e.key.role, "error", classify("revoke lease", "sys/leases/revoke", err))
		return
	}
	s.log.Debug("vault lease revoked", "lease_id", e.id, "upstream", e.key.upstream, "role", e.key.role, "why", why)
}

// end marks e ended with reason and closes Done; it reports whether this call
// ended it.
func (s *Source) end(e *leaseEntry, reason string) bool {
	s.mu.Lock()
	if e.ended {
		s.mu.Unlock()
		return false
	}
	e.ended, e.reason = true, reason
	if s.leases[e.key] == e {
		delete(s.leases, e.key)
	}
	delete(s.live, e)
	if e.linger != nil {
		e.linger.Stop()
		e.linger = nil
	}
	users := e.refs
	s.mu.Unlock()
	close(e.stop)
	close(e.done)
	level := slogLevelFor(reason, users)
	s.log.Log(context.Background(), level, "vault lease ended", "lease_id", e.id,
		"upstream", e.key.upstream, "role", e.key.role, "reason", reason, "sessions", users)
	return true
}

// watch renews e before it expires, looks it up now and then to notice a
// revocation or a shortened TTL made in Vault, and ends it when it is gone.
func (s *Source) watch(e *leaseEntry) {
	defer s.wg.Done()
	check := s.cfg.leaseCheckInterval()
	now := time.Now()
	nextCheck := now.Add(check)
	nextRenew := now.Add(e.ttl0 * 2 / 3)
	lookupWarned := false
	for {
		s.mu.Lock()
		exp, renewing := e.expires, !e.capped && !e.noRenew
		s.mu.Unlock()
		next := exp
		if nextCheck.Before(next) {
			next = nextCheck
		}
		if renewing && nextRenew.Before(next) {
			next = nextRenew
		}
		t := time.NewTimer(time.Until(next))
		select {
		case <-e.stop:
			t.Stop()
			return
		case <-s.closing:
			t.Stop()
			return
		case <-t.C:
		}
		now = time.Now()
		if !now.Before(exp) {
			s.end(e, ReasonExpired)
			return
		}
		if renewing && !now.Before(nextRenew) {
			d, err := s.renewLease(e)
			switch {
			case err == nil:
				nextRenew = time.Now().Add(d * 2 / 3)
				nextCheck = time.Now().Add(check)
			case errors.Is(err, secrets.ErrNotFound) && strings.Contains(err.Error(), "not renewable"):
				// Still valid until its TTL; only renewal is over.
				s.mu.Lock()
				e.capped = true
				s.mu.Unlock()
			case errors.Is(err, secrets.ErrNotFound):
				s.end(e, s.goneReason(e))
				return
			default:
				// Including 403: pgward's token may be between logins. A
				// policy that lacks sys/leases/renew shows up here, loudly.
				s.log.Warn("vault lease renewal failed; retrying", "lease_id", e.id,
					"upstream", e.key.upstream, "role", e.key.role, "error", err)
				nextRenew = time.Now().Add(min(5*time.Second, max(time.Until(exp)/3, 100*time.Millisecond)))
			}
		}
		if !now.Before(nextCheck) {
			err := s.lookupLease(e)
			switch {
			case err == nil:
				nextCheck = time.Now().Add(check)
			case errors.Is(err, secrets.ErrNotFound):
				s.end(e, s.goneReason(e))
				return
			case errors.Is(err, secrets.ErrDenied) && !lookupWarned:
				lookupWarned = true
				s.log.Warn("vault lease lookup denied; revocations made in Vault are noticed only at renewal",
					"lease_id", e.id, "upstream", e.key.upstream, "role", e.key.role, "error", err)
				nextCheck = time.Now().Add(check)
			default:
				s.log.Debug("vault lease lookup failed", "lease_id", e.id, "error", err)
				nextCheck = time.Now().Add(check)
			}
		}
	}
}

// goneReason says why a lease Vault no longer knows has ended. Our idea of
// its end is Vault's plus the latency of the response that told us, so a
// lease that vanishes in its last moments (the lesser of 1 s and a quarter
// of its duration) has expired; one that vanishes earlier was revoked.
func (s *Source) goneReason(e *leaseEntry) string {
	s.mu.Lock()
	left := time.Until(e.expires)
	s.mu.Unlock()
	if left <= min(time.Second, e.ttl0/4) {
		return ReasonExpired
	}
	return ReasonRevoked
}

// renewLease asks for the lease's original duration again and records what
// Vault granted.
func (s *Source) renewLease(e *leaseEntry) (time.Duration, error) {
	ctx, cancel := s.requestContext()
	defer cancel()
	var sec *api.Secret
	err := s.call(ctx, func(ctx context.Context) (err error) {
		sec, err = s.client.Sys().RenewWithContext(ctx, e.id, int(e.ttl0/time.Second))
		return err
	})
	if err != nil {
		return 0, classify("renew lease", "sys/leases/renew", err)
	}
	if sec == nil {
		return 0, &Error{Op: "renew lease", Path: "sys/leases/renew", Detail: "empty answer", Kind: secrets.ErrUnavailable}
	}
	d := time.Duration(sec.LeaseDuration) * time.Second
	exp := time.Now().Add(d)
	s.mu.Lock()
	if !exp.After(e.expires.Add(time.Second)) || !sec.Renewable {
		e.capped = true // at its max TTL: renewing again will not help
	}
	e.expires = exp
	s.mu.Unlock()
	s.log.Debug("vault lease renewed", "lease_id", e.id, "upstream", e.key.upstream, "role", e.key.role, "ttl", d.String())
	return d, nil
}

// lookupLease reads the lease's remaining TTL; a lease Vault no longer knows
// was revoked.
func (s *Source) lookupLease(e *leaseEntry) error {
	ctx, cancel := s.requestContext()
	defer cancel()
	var sec *api.Secret
	err := s.call(ctx, func(ctx context.Context) (err error) {
		sec, err = s.client.Sys().LookupWithContext(ctx, e.id)
		return err
	})
	if err != nil {
		return classify("look up lease", "sys/leases/lookup", err)
	}
	if sec == nil || sec.Data == nil {
		return &Error{Op: "look up lease", Path: "sys/leases/lookup", Detail: "lease not found", Kind: secrets.ErrNotFound}
	}
	n, ok := sec.Data["ttl"].(json.Number)
	if !ok {
		return nil
	}
	secs, err := n.Int64()
	if err != nil {
		return nil
	}
	ttl := time.Duration(secs) * time.Second
	exp := time.Now().Add(ttl)
	s.mu.Lock()
	shortened := exp.Before(e.expires.Add(-time.Second))
	if shortened {
		// Shortened in Vault (or a max TTL we did not know): believe Vault.
		e.expires = exp
		e.capped = true
	}
	s.mu.Unlock()
	if shortened {
		s.log.Info("vault lease shortened in Vault", "lease_id", e.id, "upstream", e.key.upstream,
			"role", e.key.role, "ttl", ttl.String())
	}
	return nil
}
