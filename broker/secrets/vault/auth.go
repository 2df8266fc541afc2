package vault

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/vault/api"
	"github.com/hashicorp/vault/api/auth/approle"
	"github.com/hashicorp/vault/api/auth/kubernetes"

	"github.com/pgward/pgward/broker/secrets"
)

// reloginMinInterval keeps a genuine "permission denied" (a policy that
// lacks a path) from turning every fetch into a login.
const reloginMinInterval = 2 * time.Second

// authenticator owns pgward's Vault token: it logs in, keeps the token
// renewed on its own goroutine, and logs in again when the token stops
// working. The token is set on the shared client and never logged.
type authenticator struct {
	cfg     AuthConfig
	client  *api.Client // the token is set here
	login   *api.Client // token-less twin, for login requests
	timeout time.Duration
	log     *slog.Logger
	flights flightGroup
	wake    chan struct{}

	mu        sync.Mutex
	gen       int           // login generation; 0 = never logged in
	at        time.Time     // when ttl was last granted
	ttl       time.Duration // remaining TTL as of at; 0 = does not expire
	loginTTL  time.Duration // TTL granted at login
	renewable bool
	lastLogin time.Time
}

// ensure logs in if there is no token yet.
func (a *authenticator) ensure(ctx context.Context) error {
	a.mu.Lock()
	gen := a.gen
	a.mu.Unlock()
	if gen != 0 {
		return nil
	}
	return a.relogin(ctx, 0)
}

// generation is the current login generation, to pass to relogin.
func (a *authenticator) generation() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.gen
}

// shouldRelogin reports whether a 403 seen with token generation gen is worth
// a new login: the token may have expired or been revoked.
func (a *authenticator) shouldRelogin(gen int) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return gen != a.gen || time.Since(a.lastLogin) >= reloginMinInterval
}

// relogin logs in again unless a login newer than generation gen happened
// meanwhile. Concurrent callers share one login.
func (a *authenticator) relogin(ctx context.Context, gen int) error {
	a.mu.Lock()
	cur := a.gen
	a.mu.Unlock()
	if gen != cur && cur != 0 {
		return nil
	}
	_, err := a.flights.do(ctx, "login", func() (any, error) {
		lctx, cancel := context.WithTimeout(context.Background(), a.timeout)
		defer cancel()
		return nil, a.doLogin(lctx)
	})
	if err != nil {
		return classify("log in ("+a.cfg.Method+")", a.loginPath(), err)
	}
	return nil
}

func (a *authenticator) loginPath() string {
	if a.cfg.Method == MethodToken {
		return "auth/token/lookup-self"
	}
	return "auth/" + a.cfg.mount() + "/login"
}

func (a *authenticator) doLogin(ctx context.Context) error {
	var (
		tok       string
		ttl       time.Duration
		renewable bool
		policies  []string
	)
	switch a.cfg.Method {
	case MethodToken:
		b, err := os.ReadFile(a.cfg.TokenFile)
		if err != nil {
			return err
		}
		tok = strings.TrimSpace(string(b))
		if tok == "" {
			return &Error{Op: "log in (token)", Path: a.cfg.TokenFile, Detail: "token file is empty", Kind: secrets.ErrDenied}
		}
		// Look the token up with a client of its own: the shared client
		// keeps the old token until this one is known to work.
		c, err := a.login.Clone()
		if err != nil {
			return err
		}
		c.SetToken(tok)
		sec, err := c.Auth().Token().LookupSelfWithContext(ctx)
		if err != nil {
			return err
		}
		if sec == nil || sec.Data == nil {
			return &Error{Op: "log in (token)", Path: "auth/token/lookup-self", Detail: "empty answer", Kind: secrets.ErrUnavailable}
		}
		if n, ok := sec.Data["ttl"].(json.Number); ok {
			secs, _ := n.Int64()
			ttl = time.Duration(secs) * time.Second
		}
		renewable, _ = sec.Data["renewable"].(bool)
		policies, _ = sec.TokenPolicies()
	default:
		var method api.AuthMethod
		var err error
		switch a.cfg.Method {
		case MethodAppRole:
			method, err = approle.NewAppRoleAuth(a.cfg.RoleID, &approle.SecretID{FromFile: a.cfg.SecretIDFile},
				approle.WithMountPath(a.cfg.mount()))
		case MethodKubernetes:
			// Built per login: the helper reads the (rotating) JWT now.
			method, err = kubernetes.NewKubernetesAuth(a.cfg.Role,
				kubernetes.WithServiceAccountTokenPath(a.cfg.jwtFile()), kubernetes.WithMountPath(a.cfg.mount()))
		default:
			return fmt.Errorf("unknown auth method %q", a.cfg.Method)
		}
		if err != nil {
			return err
		}
		sec, err := method.Login(ctx, a.login)
		if err != nil {
			return err
		}
		if sec == nil || sec.Auth == nil || sec.Auth.ClientToken == "" {
			return &Error{Op: "log in (" + a.cfg.Method + ")", Path: a.loginPath(), Detail: "answer has no client token", Kind: secrets.ErrUnavailable}
		}
		tok = sec.Auth.ClientToken
		ttl = time.Duration(sec.Auth.LeaseDuration) * time.Second
		renewable = sec.Auth.Renewable
		policies = sec.Auth.Policies
	}
	a.client.SetToken(tok)
	a.mu.Lock()
	a.gen++
	a.at = time.Now()
	a.ttl = ttl
	a.loginTTL = ttl
	a.renewable = renewable
	a.lastLogin = a.at
	a.mu.Unlock()
	a.log.Info("vault login", "method", a.cfg.Method, "path", a.loginPath(), "ttl", ttl.String(),
		"renewable", renewable, "policies", policies)
	select {
	case a.wake <- struct{}{}:
	default:
	}
	return nil
}

// run keeps the token alive until stop is closed: it renews a renewable
// token when two thirds of its TTL have passed, and logs in again when the
// token cannot be renewed (not renewable, at its max TTL, revoked).
func (a *authenticator) run(stop <-chan struct{}) {
	retry := time.Second
	var retryAt time.Time
	for {
		a.mu.Lock()
		gen, at, ttl, renewable := a.gen, a.at, a.ttl, a.renewable
		a.mu.Unlock()

		var next time.Time
		switch {
		case !retryAt.IsZero():
			next = retryAt
		case gen == 0:
			next = time.Now() // not logged in yet (Vault was down at start)
		case ttl > 0:
			next = at.Add(ttl * 2 / 3)
		}
		var timer <-chan time.Time
		var t *time.Timer
		if !next.IsZero() {
			t = time.NewTimer(time.Until(next))
			timer = t.C
		}
		woken := false
		select {
		case <-stop:
		case <-a.wake:
			woken = true
		case <-timer:
		}
		if t != nil {
			t.Stop()
		}
		select {
		case <-stop:
			return
		default:
		}
		if woken {
			retryAt = time.Time{}
			continue
		}

		var err error
		if gen != 0 && renewable {
			err = a.renew()
			if err != nil {
				a.log.Warn("vault token renewal failed; logging in again", "method", a.cfg.Method, "error", err)
			}
		}
		if gen == 0 || !renewable || err != nil {
			err = a.relogin(context.Background(), gen)
		}
		if err != nil {
			a.log.Warn("vault login failed; will retry", "method", a.cfg.Method, "retry_in", retry.String(), "error", err)
			retryAt = time.Now().Add(retry)
			retry = min(retry*2, 30*time.Second)
			continue
		}
		retry, retryAt = time.Second, time.Time{}
	}
}

// renew renews the token once. It fails when the renewal did not extend the
// token enough to be worth keeping (it reached its max TTL), so that the
// caller logs in again before it expires.
func (a *authenticator) renew() error {
	ctx, cancel := context.WithTimeout(context.Background(), a.timeout)
	defer cancel()
	// Increment 0: the token's own TTL, as its role or policy sets it.
	sec, err := a.client.Auth().Token().RenewSelfWithContext(ctx, 0)
	if err != nil {
		return classify("renew token", "auth/token/renew-self", err)
	}
	if sec == nil || sec.Auth == nil {
		return &Error{Op: "renew token", Path: "auth/token/renew-self", Detail: "empty answer", Kind: secrets.ErrUnavailable}
	}
	got := time.Duration(sec.Auth.LeaseDuration) * time.Second
	a.mu.Lock()
	a.at, a.ttl, a.renewable = time.Now(), got, sec.Auth.Renewable
	loginTTL := a.loginTTL
	a.mu.Unlock()
	a.log.Debug("vault token renewed", "ttl", got.String())
	if got < loginTTL/3 {
		return errors.New("token is near its max TTL")
	}
	return nil
}
