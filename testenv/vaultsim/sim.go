package vaultsim

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Options configure a Server.
type Options struct {
	// TLS serves HTTPS with httptest's self-signed certificate (valid for
	// 127.0.0.1); CACertPEM returns the certificate to trust.
	TLS bool
	// RootToken is a token that never expires. Empty: a random one, see
	// Server.RootToken.
	RootToken string
	// Exec runs one SQL string (possibly several statements) as a Postgres
	// superuser. It is what the database engine creates, renews and drops
	// login roles with. Nil: creds requests answer 500.
	Exec func(ctx context.Context, sql string) error
	// Logf, when set, receives one line per request and per database action
	// (never a password or a token).
	Logf func(format string, args ...any)
}

// TokenOptions describe a token the simulator hands out or accepts.
type TokenOptions struct {
	// TTL is the token's lease duration; 0 means it never expires.
	TTL time.Duration
	// MaxTTL caps renewals (0: 32 days, Vault's default max).
	MaxTTL time.Duration
	// Renewable lets renew-self extend the token.
	Renewable bool
	// Policies are reported by login and lookup-self; they grant nothing.
	Policies []string
}

// AppRole is a role of an AppRole auth mount.
type AppRole struct {
	RoleID   string
	SecretID string
	Token    TokenOptions
}

// KubernetesRole is a role of a Kubernetes auth mount; it accepts exactly
// the service account token JWT.
type KubernetesRole struct {
	Name  string
	JWT   string
	Token TokenOptions
}

// DatabaseRole is a role of a database secrets engine mount. Statements are
// templates with Vault's {{name}} (also {{username}}), {{password}} and
// {{expiration}}.
type DatabaseRole struct {
	// CreationStatements run, in order, when credentials are issued.
	// Default: CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}'
	// VALID UNTIL '{{expiration}}'.
	CreationStatements []string
	// RenewStatements run when the lease is renewed. Default: ALTER ROLE
	// "{{name}}" VALID UNTIL '{{expiration}}'.
	RenewStatements []string
	// RevocationStatements run when the lease is revoked or expires. Default:
	// terminate the role's backends, DROP OWNED BY it (in the Exec database,
	// which removes its grants there) and DROP ROLE.
	RevocationStatements []string
	// DefaultTTL is the lease duration (default 1h).
	DefaultTTL time.Duration
	// MaxTTL caps renewals (default 24h).
	MaxTTL time.Duration
}

// Fault makes requests misbehave. Zero Status only delays.
type Fault struct {
	// Path is the prefix of the request path after /v1/ the fault applies
	// to, such as "database/creds/" or "sys/leases/renew"; "" is every path.
	Path string
	// Status is the HTTP status to answer with instead of serving.
	Status int
	// Errors is the {"errors":[…]} list. Nil: what Vault says for Status
	// ("permission denied" for 403, an empty list for 404, …).
	Errors []string
	// Delay holds the request this long first (until the client gives up or
	// the server closes).
	Delay time.Duration
	// Times is how many requests the fault applies to; 0 means until removed.
	Times int
}

// Request is a recorded request (never its body or token).
type Request struct {
	Method string
	Path   string // after /v1/
	Query  string
	Time   time.Time
}

// Lease describes an outstanding lease.
type Lease struct {
	ID        string
	Username  string
	Mount     string
	Role      string
	Issued    time.Time
	Expire    time.Time
	Renewable bool
	Renewals  int
}

// Server is a running simulator. Its methods are safe for concurrent use.
type Server struct {
	ts        *httptest.Server
	opts      Options
	rootToken string
	done      chan struct{}
	closeOnce sync.Once
	bg        sync.WaitGroup

	mu       sync.Mutex
	closed   bool
	sealed   bool
	tokens   map[string]*token
	kv       map[string]map[string][]kvVersion // mount → path → versions
	dbRoles  map[string]DatabaseRole           // "mount/role"
	dbMounts map[string]bool
	leases   map[string]*lease
	approles map[string]map[string]AppRole // mount → role_id
	k8s      map[string]map[string]KubernetesRole
	faults   []*faultState
	requests []Request
	pkiRoles map[string]PKIRole // "mount/role" (pki.go)
	issued   []IssuedCert
}

type token struct {
	id, accessor string
	opts         TokenOptions
	path         string
	issued       time.Time
	expire       time.Time // zero: never
	maxExpire    time.Time
}

type kvVersion struct {
	data    map[string]any
	created time.Time
}

type lease struct {
	Lease
	maxExpire time.Time
	role      DatabaseRole
	timer     *time.Timer
}

type faultState struct {
	Fault
	left int // remaining uses when Times > 0
}

// New starts a simulator. Close it when done.
func New(opts Options) *Server {
	s := &Server{
		opts:     opts,
		done:     make(chan struct{}),
		tokens:   map[string]*token{},
		kv:       map[string]map[string][]kvVersion{},
		dbRoles:  map[string]DatabaseRole{},
		dbMounts: map[string]bool{},
		leases:   map[string]*lease{},
		approles: map[string]map[string]AppRole{},
		k8s:      map[string]map[string]KubernetesRole{},
	}
	s.rootToken = opts.RootToken
	if s.rootToken == "" {
		s.rootToken = "hvs.root" + randomString(20)
	}
	now := time.Now()
	s.tokens[s.rootToken] = &token{id: s.rootToken, accessor: randomString(24),
		opts: TokenOptions{Policies: []string{"root"}}, path: "auth/token/root", issued: now}
	s.ts = httptest.NewUnstartedServer(http.HandlerFunc(s.serve))
	s.ts.Config.ErrorLog = log.New(io.Discard, "", 0) // TLS handshake noise from tests of bad CAs
	if opts.TLS {
		s.ts.StartTLS()
	} else {
		s.ts.Start()
	}
	return s
}

// Addr is the server's base URL, such as http://127.0.0.1:40123.
func (s *Server) Addr() string { return s.ts.URL }

// CACertPEM is the PEM certificate to trust for a TLS server (nil without TLS).
func (s *Server) CACertPEM() []byte {
	if s.ts.Certificate() == nil {
		return nil
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: s.ts.Certificate().Raw})
}

// RootToken is a token that never expires.
func (s *Server) RootToken() string { return s.rootToken }

// Close stops serving (clients then get connection refused), releases held
// requests, and revokes every outstanding lease, dropping its login role.
// It is idempotent.
func (s *Server) Close() {
	s.closeOnce.Do(func() {
		s.mu.Lock()
		s.closed = true
		close(s.done)
		leases := make([]*lease, 0, len(s.leases))
		for id, l := range s.leases {
			l.timer.Stop()
			leases = append(leases, l)
			delete(s.leases, id)
		}
		s.mu.Unlock()
		s.ts.CloseClientConnections()
		s.ts.Close()
		for _, l := range leases {
			s.dropRole(l)
		}
		s.bg.Wait()
	})
}

// AddToken makes tok a valid token.
func (s *Server) AddToken(tok string, o TokenOptions) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.tokens[tok] = newToken(tok, o, "auth/token/create")
}

// RevokeToken makes tok invalid: requests with it get 403 permission denied.
func (s *Server) RevokeToken(tok string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.tokens, tok)
}

// AddAppRole registers an AppRole role on an auth mount (such as "approle").
func (s *Server) AddAppRole(mount string, r AppRole) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.approles[mount] == nil {
		s.approles[mount] = map[string]AppRole{}
	}
	s.approles[mount][r.RoleID] = r
}

// AddKubernetesRole registers a role on a Kubernetes auth mount (such as
// "kubernetes").
func (s *Server) AddKubernetesRole(mount string, r KubernetesRole) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.k8s[mount] == nil {
		s.k8s[mount] = map[string]KubernetesRole{}
	}
	s.k8s[mount][r.Name] = r
}

// PutKV writes a new version of a KV v2 secret (creating the mount) and
// returns its version number.
func (s *Server) PutKV(mount, path string, data map[string]any) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.putKV(mount, path, data)
}

func (s *Server) putKV(mount, path string, data map[string]any) int {
	if s.kv[mount] == nil {
		s.kv[mount] = map[string][]kvVersion{}
	}
	cp := make(map[string]any, len(data))
	for k, v := range data {
		cp[k] = v
	}
	s.kv[mount][path] = append(s.kv[mount][path], kvVersion{data: cp, created: time.Now().UTC()})
	return len(s.kv[mount][path])
}

// AddDatabaseRole registers a role on a database engine mount (such as
// "database").
func (s *Server) AddDatabaseRole(mount, name string, r DatabaseRole) {
	if len(r.CreationStatements) == 0 {
		r.CreationStatements = []string{`CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';`}
	}
	if len(r.RenewStatements) == 0 {
		r.RenewStatements = []string{`ALTER ROLE "{{name}}" VALID UNTIL '{{expiration}}';`}
	}
	if len(r.RevocationStatements) == 0 {
		r.RevocationStatements = []string{
			`SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{{name}}';`,
			`DROP OWNED BY "{{name}}";`,
			`DROP ROLE IF EXISTS "{{name}}";`,
		}
	}
	if r.DefaultTTL <= 0 {
		r.DefaultTTL = time.Hour
	}
	if r.MaxTTL <= 0 {
		r.MaxTTL = 24 * time.Hour
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.dbMounts[mount] = true
	s.dbRoles[mount+"/"+name] = r
}

// Seal makes every request answer 503 {"errors":["Vault is sealed"]}.
func (s *Server) Seal() { s.mu.Lock(); s.sealed = true; s.mu.Unlock() }

// Unseal undoes Seal.
func (s *Server) Unseal() { s.mu.Lock(); s.sealed = false; s.mu.Unlock() }

// Inject adds a fault; remove takes it away again. Faults are checked in the
// order they were added; the first that matches a request applies.
func (s *Server) Inject(f Fault) (remove func()) {
	fs := &faultState{Fault: f, left: f.Times}
	s.mu.Lock()
	s.faults = append(s.faults, fs)
	s.mu.Unlock()
	return func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		for i, x := range s.faults {
			if x == fs {
				s.faults = append(s.faults[:i], s.faults[i+1:]...)
				return
			}
		}
	}
}

// ClearFaults removes every injected fault.
func (s *Server) ClearFaults() { s.mu.Lock(); s.faults = nil; s.mu.Unlock() }

// Requests returns the recorded requests, oldest first.
func (s *Server) Requests() []Request {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Request(nil), s.requests...)
}

// Count returns how many recorded requests had the method (any if "") and
// a path starting with prefix.
func (s *Server) Count(method, prefix string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, r := range s.requests {
		if (method == "" || r.Method == method) && strings.HasPrefix(r.Path, prefix) {
			n++
		}
	}
	return n
}

// Leases returns the outstanding leases, sorted by issue time.
func (s *Server) Leases() []Lease {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Lease, 0, len(s.leases))
	for _, l := range s.leases {
		out = append(out, l.Lease)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Issued.Before(out[j].Issued) })
	return out
}

// RevokeLease revokes a lease from the server side, as `vault lease revoke`
// does: the login role's backends are terminated and the role is dropped.
func (s *Server) RevokeLease(id string) error {
	s.mu.Lock()
	l, ok := s.leases[id]
	if ok {
		l.timer.Stop()
		delete(s.leases, id)
	}
	s.mu.Unlock()
	if !ok {
		return fmt.Errorf("vaultsim: no lease %q", id)
	}
	return s.dropRole(l)
}

// SetLeaseTTL shortens (or sets) a lease's remaining lifetime to d and caps
// its renewals there, as a max_ttl would. The lease expires — its role is
// dropped — when d has passed.
func (s *Server) SetLeaseTTL(id string, d time.Duration) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	l, ok := s.leases[id]
	if !ok {
		return fmt.Errorf("vaultsim: no lease %q", id)
	}
	l.Expire = time.Now().Add(d)
	l.maxExpire = l.Expire
	l.timer.Reset(d)
	return nil
}

// ---- HTTP ----

type response struct {
	RequestID     string   `json:"request_id"`
	LeaseID       string   `json:"lease_id"`
	Renewable     bool     `json:"renewable"`
	LeaseDuration int      `json:"lease_duration"`
	Data          any      `json:"data"`
	WrapInfo      any      `json:"wrap_info"`
	Warnings      []string `json:"warnings"`
	Auth          any      `json:"auth"`
	MountType     string   `json:"mount_type"`
}

func (s *Server) logf(format string, args ...any) {
	if s.opts.Logf != nil {
		s.opts.Logf("vaultsim: "+format, args...)
	}
}

func (s *Server) serve(w http.ResponseWriter, r *http.Request) {
	path := strings.TrimPrefix(r.URL.Path, "/v1/")
	if path == r.URL.Path {
		writeErrors(w, http.StatusNotFound, nil)
		return
	}
	s.mu.Lock()
	s.requests = append(s.requests, Request{Method: r.Method, Path: path, Query: r.URL.RawQuery, Time: time.Now()})
	sealed := s.sealed
	var fault *Fault
	for _, f := range s.faults {
		if strings.HasPrefix(path, f.Path) {
			cp := f.Fault
			fault = &cp
			if f.Times > 0 {
				f.left--
				if f.left <= 0 {
					for i, x := range s.faults {
						if x == f {
							s.faults = append(s.faults[:i], s.faults[i+1:]...)
							break
						}
					}
				}
			}
			break
		}
	}
	s.mu.Unlock()
	s.logf("%s /v1/%s", r.Method, path)

	if fault != nil && fault.Delay > 0 {
		t := time.NewTimer(fault.Delay)
		select {
		case <-t.C:
		case <-r.Context().Done():
			t.Stop()
			return
		case <-s.done:
			t.Stop()
			return
		}
	}
	if sealed && path != "sys/health" && path != "sys/seal-status" {
		writeErrors(w, http.StatusServiceUnavailable, []string{"Vault is sealed"})
		return
	}
	if fault != nil && fault.Status != 0 {
		writeErrors(w, fault.Status, fault.Errors)
		return
	}

	switch {
	case path == "sys/health":
		s.health(w, r, sealed)
		return
	case path == "sys/seal-status":
		writeJSON(w, http.StatusOK, map[string]any{"type": "shamir", "initialized": true, "sealed": sealed,
			"t": 1, "n": 1, "progress": 0, "version": "1.99.0-vaultsim"})
		return
	case strings.HasPrefix(path, "auth/") && strings.HasSuffix(path, "/login") && path != "auth/token/login":
		if !isWrite(r) {
			writeErrors(w, http.StatusMethodNotAllowed, []string{"unsupported operation"})
			return
		}
		s.login(w, r, strings.TrimSuffix(strings.TrimPrefix(path, "auth/"), "/login"))
		return
	}

	tok, ok := s.checkToken(r.Header.Get("X-Vault-Token"))
	if !ok {
		writeErrors(w, http.StatusForbidden, []string{"permission denied"})
		return
	}
	switch {
	case path == "auth/token/lookup-self":
		s.lookupSelf(w, tok)
	case path == "auth/token/renew-self" && isWrite(r):
		s.renewSelf(w, r, tok)
	case path == "sys/leases/renew" && isWrite(r):
		s.renewLease(w, r)
	case path == "sys/leases/revoke" && isWrite(r):
		s.revokeLease(w, r)
	case path == "sys/leases/lookup" && isWrite(r):
		s.lookupLease(w, r)
	default:
		mount, rest, _ := strings.Cut(path, "/")
		s.mu.Lock()
		_, isKV := s.kv[mount]
		isDB := s.dbMounts[mount]
		s.mu.Unlock()
		switch {
		case strings.HasPrefix(rest, "issue/") && isWrite(r) && s.isPKIMount(mount):
			s.pkiIssue(w, r, mount, strings.TrimPrefix(rest, "issue/"))
		case isDB && strings.HasPrefix(rest, "creds/") && (r.Method == http.MethodGet || isWrite(r)):
			s.creds(w, r, mount, strings.TrimPrefix(rest, "creds/"))
		case isKV && strings.HasPrefix(rest, "data/") && r.Method == http.MethodGet:
			s.readKV(w, r, mount, strings.TrimPrefix(rest, "data/"))
		case isKV && strings.HasPrefix(rest, "data/") && isWrite(r):
			s.writeKV(w, r, mount, strings.TrimPrefix(rest, "data/"))
		default:
			writeErrors(w, http.StatusNotFound, []string{fmt.Sprintf("no handler for route %q. route entry not found.", path)})
		}
	}
}

func isWrite(r *http.Request) bool { return r.Method == http.MethodPut || r.Method == http.MethodPost }

// health answers like Vault: 200 when unsealed and active, 503 when sealed,
// or the codes the caller asks for (?activecode=, ?sealedcode=).
func (s *Server) health(w http.ResponseWriter, r *http.Request, sealed bool) {
	status, param := http.StatusOK, "activecode"
	if sealed {
		status, param = http.StatusServiceUnavailable, "sealedcode"
	}
	if v, err := strconv.Atoi(r.URL.Query().Get(param)); err == nil && v >= 200 && v < 600 {
		status = v
	}
	writeJSON(w, status, map[string]any{"initialized": true, "sealed": sealed, "standby": false,
		"server_time_utc": time.Now().Unix(), "version": "1.99.0-vaultsim"})
}

func (s *Server) checkToken(id string) (*token, bool) {
	if id == "" {
		return nil, false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	t, ok := s.tokens[id]
	if !ok {
		return nil, false
	}
	if !t.expire.IsZero() && time.Now().After(t.expire) {
		delete(s.tokens, id)
		return nil, false
	}
	cp := *t
	return &cp, true
}

func newToken(id string, o TokenOptions, path string) *token {
	now := time.Now()
	t := &token{id: id, accessor: randomString(24), opts: o, path: path, issued: now}
	if o.TTL > 0 {
		t.expire = now.Add(o.TTL)
		maxTTL := o.MaxTTL
		if maxTTL <= 0 {
			maxTTL = 32 * 24 * time.Hour
		}
		t.maxExpire = now.Add(maxTTL)
	}
	return t
}

func (s *Server) issueToken(o TokenOptions, path string, meta map[string]string) map[string]any {
	t := newToken("hvs."+randomString(24), o, path)
	s.mu.Lock()
	s.tokens[t.id] = t
	s.mu.Unlock()
	return authBlock(t, meta)
}

func authBlock(t *token, meta map[string]string) map[string]any {
	pol := append([]string{"default"}, t.opts.Policies...)
	return map[string]any{
		"client_token":   t.id,
		"accessor":       t.accessor,
		"policies":       pol,
		"token_policies": pol,
		"metadata":       meta,
		"lease_duration": ttlSeconds(t),
		"renewable":      t.opts.Renewable && t.opts.TTL > 0,
		"entity_id":      "",
		"token_type":     "service",
		"orphan":         true,
	}
}

func ttlSeconds(t *token) int {
	if t.expire.IsZero() {
		return 0
	}
	return int(time.Until(t.expire).Round(time.Second) / time.Second)
}

func (s *Server) login(w http.ResponseWriter, r *http.Request, mount string) {
	var body map[string]any
	if err := json.NewDecoder(io.LimitReader(r.Body, 1<<20)).Decode(&body); err != nil {
		writeErrors(w, http.StatusBadRequest, []string{"failed to parse JSON input: " + err.Error()})
		return
	}
	str := func(k string) string { v, _ := body[k].(string); return v }
	s.mu.Lock()
	ar, isAppRole := s.approles[mount]
	kr, isK8s := s.k8s[mount]
	s.mu.Unlock()
	switch {
	case isAppRole:
		roleID, secretID := str("role_id"), str("secret_id")
		if roleID == "" {
			writeErrors(w, http.StatusBadRequest, []string{"missing role_id"})
			return
		}
		role, ok := ar[roleID]
		if !ok {
			writeErrors(w, http.StatusBadRequest, []string{"invalid role ID"})
			return
		}
		if secretID == "" || secretID != role.SecretID {
			writeErrors(w, http.StatusBadRequest, []string{"invalid secret id"})
			return
		}
		auth := s.issueToken(role.Token, "auth/"+mount+"/login", map[string]string{"role_name": "pgward"})
		writeJSON(w, http.StatusOK, response{RequestID: randomUUID(), Auth: auth})
	case isK8s:
		name, jwt := str("role"), str("jwt")
		role, ok := kr[name]
		if !ok {
			writeErrors(w, http.StatusBadRequest, []string{fmt.Sprintf("invalid role name %q", name)})
			return
		}
		if jwt == "" || jwt != role.JWT {
			writeErrors(w, http.StatusForbidden, []string{"permission denied"})
			return
		}
		auth := s.issueToken(role.Token, "auth/"+mount+"/login", map[string]string{"role": name,
			"service_account_name": "pgward", "service_account_namespace": "pgward"})
		writeJSON(w, http.StatusOK, response{RequestID: randomUUID(), Auth: auth})
	default:
		writeErrors(w, http.StatusNotFound, []string{fmt.Sprintf("no handler for route %q. route entry not found.", "auth/"+mount+"/login")})
	}
}

func (s *Server) lookupSelf(w http.ResponseWriter, t *token) {
	var expire any
	if !t.expire.IsZero() {
		expire = t.expire.UTC().Format(time.RFC3339Nano)
	}
	writeJSON(w, http.StatusOK, response{RequestID: randomUUID(), Data: map[string]any{
		"accessor":         t.accessor,
		"creation_time":    t.issued.Unix(),
		"creation_ttl":     int(t.opts.TTL / time.Second),
		"display_name":     "token",
		"entity_id":        "",
		"expire_time":      expire,
		"explicit_max_ttl": 0,
		"id":               t.id,
		"issue_time":       t.issued.UTC().Format(time.RFC3339Nano),
		"meta":             nil,
		"num_uses":         0,
		"orphan":           true,
		"path":             t.path,
		"policies":         append([]string{"default"}, t.opts.Policies...),
		"renewable":        t.opts.Renewable && t.opts.TTL > 0,
		"ttl":              ttlSeconds(t),
		"type":             "service",
	}})
}

func (s *Server) renewSelf(w http.ResponseWriter, r *http.Request, t *token) {
	body, err := readBody(r)
	var inc time.Duration
	if err == nil {
		inc, err = parseDuration(body["increment"])
	}
	if err != nil {
		writeErrors(w, http.StatusBadRequest, []string{err.Error()})
		return
	}
	s.mu.Lock()
	cur, ok := s.tokens[t.id]
	if !ok || !cur.opts.Renewable || cur.opts.TTL <= 0 {
		s.mu.Unlock()
		writeErrors(w, http.StatusBadRequest, []string{"lease is not renewable"})
		return
	}
	if inc <= 0 {
		inc = cur.opts.TTL
	}
	exp := time.Now().Add(inc)
	if exp.After(cur.maxExpire) {
		exp = cur.maxExpire
	}
	cur.expire = exp
	auth := authBlock(cur, nil)
	s.mu.Unlock()
	writeJSON(w, http.StatusOK, response{RequestID: randomUUID(), Auth: auth})
}

// readBody decodes a JSON object body; an empty body is an empty object.
func readBody(r *http.Request) (map[string]any, error) {
	body := map[string]any{}
	dec := json.NewDecoder(io.LimitReader(r.Body, 1<<20))
	dec.UseNumber()
	if err := dec.Decode(&body); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("failed to parse JSON input: %w", err)
	}
	return body, nil
}

// parseDuration reads an increment or TTL: seconds as a number or string, or
// a Go duration string, as Vault accepts.
func parseDuration(v any) (time.Duration, error) {
	switch x := v.(type) {
	case nil:
		return 0, nil
	case json.Number:
		n, err := x.Int64()
		if err != nil {
			return 0, fmt.Errorf("invalid increment %q", x)
		}
		return time.Duration(n) * time.Second, nil
	case string:
		if x == "" {
			return 0, nil
		}
		if n, err := strconv.Atoi(x); err == nil {
			return time.Duration(n) * time.Second, nil
		}
		d, err := time.ParseDuration(x)
		if err != nil {
			return 0, fmt.Errorf("invalid increment %q", x)
		}
		return d, nil
	}
	return 0, fmt.Errorf("invalid increment")
}

// leaseBody reads {"lease_id", "increment"} and answers 400 itself when the
// body is bad.
func leaseBody(w http.ResponseWriter, r *http.Request) (id string, inc time.Duration, ok bool) {
	body, err := readBody(r)
	if err == nil {
		inc, err = parseDuration(body["increment"])
	}
	if err != nil {
		writeErrors(w, http.StatusBadRequest, []string{err.Error()})
		return "", 0, false
	}
	id, _ = body["lease_id"].(string)
	if id == "" {
		writeErrors(w, http.StatusBadRequest, []string{"missing lease ID"})
		return "", 0, false
	}
	return id, inc, true
}

func (s *Server) renewLease(w http.ResponseWriter, r *http.Request) {
	id, inc, ok := leaseBody(w, r)
	if !ok {
		return
	}
	s.mu.Lock()
	l, ok := s.leases[id]
	if !ok {
		s.mu.Unlock()
		writeErrors(w, http.StatusBadRequest, []string{"lease not found"})
		return
	}
	if !l.Renewable {
		s.mu.Unlock()
		writeErrors(w, http.StatusBadRequest, []string{"lease is not renewable"})
		return
	}
	if inc <= 0 {
		inc = l.role.DefaultTTL
	}
	now := time.Now()
	exp := now.Add(inc)
	if exp.After(l.maxExpire) {
		exp = l.maxExpire
	}
	l.Expire = exp
	l.Renewals++
	l.timer.Reset(time.Until(exp))
	cp := *l
	s.mu.Unlock()
	if err := s.runStatements(context.WithoutCancel(r.Context()), cp.role.RenewStatements, cp.Username, "", exp); err != nil {
		writeErrors(w, http.StatusInternalServerError, []string{"failed to renew: " + err.Error()})
		return
	}
	writeJSON(w, http.StatusOK, response{RequestID: randomUUID(), LeaseID: id, Renewable: true,
		LeaseDuration: int(time.Until(exp).Round(time.Second) / time.Second)})
}

func (s *Server) revokeLease(w http.ResponseWriter, r *http.Request) {
	id, _, ok := leaseBody(w, r)
	if !ok {
		return
	}
	s.mu.Lock()
	l, ok := s.leases[id]
	if ok {
		l.timer.Stop()
		delete(s.leases, id)
	}
	s.mu.Unlock()
	if ok {
		if err := s.dropRole(l); err != nil {
			writeErrors(w, http.StatusInternalServerError, []string{"failed to revoke entry: " + err.Error()})
			return
		}
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) lookupLease(w http.ResponseWriter, r *http.Request) {
	id, _, ok := leaseBody(w, r)
	if !ok {
		return
	}
	s.mu.Lock()
	l, ok := s.leases[id]
	var cp lease
	if ok {
		cp = *l
	}
	s.mu.Unlock()
	if !ok {
		writeErrors(w, http.StatusBadRequest, []string{"invalid lease"})
		return
	}
	var lastRenewal any
	if cp.Renewals > 0 {
		lastRenewal = time.Now().UTC().Format(time.RFC3339Nano)
	}
	writeJSON(w, http.StatusOK, response{RequestID: randomUUID(), Data: map[string]any{
		"id":           cp.ID,
		"issue_time":   cp.Issued.UTC().Format(time.RFC3339Nano),
		"expire_time":  cp.Expire.UTC().Format(time.RFC3339Nano),
		"last_renewal": lastRenewal,
		"renewable":    cp.Renewable,
		"ttl":          int(time.Until(cp.Expire).Round(time.Second) / time.Second),
	}})
}

func (s *Server) creds(w http.ResponseWriter, r *http.Request, mount, name string) {
	s.mu.Lock()
	role, ok := s.dbRoles[mount+"/"+name]
	s.mu.Unlock()
	if !ok {
		writeErrors(w, http.StatusBadRequest, []string{fmt.Sprintf("unknown role: %s", name)})
		return
	}
	if s.opts.Exec == nil {
		writeErrors(w, http.StatusInternalServerError, []string{"vaultsim: no database connection configured"})
		return
	}
	username := "v-" + name + "-" + strings.ToLower(randomString(16))
	if len(username) > 63 {
		username = username[:63]
	}
	password := "A1a-" + randomString(20)
	now := time.Now()
	exp := now.Add(role.DefaultTTL)
	// Not the request's context: a client that gives up mid-way must not
	// leave a half-made role behind with no lease to drop it.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := s.runStatements(ctx, role.CreationStatements, username, password, exp); err != nil {
		_ = s.dropRole(&lease{Lease: Lease{Username: username}, role: role})
		writeErrors(w, http.StatusInternalServerError, []string{"failed to create user: " + err.Error()})
		return
	}
	id := mount + "/creds/" + name + "/" + randomString(24)
	l := &lease{Lease: Lease{ID: id, Username: username, Mount: mount, Role: name, Issued: now, Expire: exp, Renewable: true},
		maxExpire: now.Add(role.MaxTTL), role: role}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		_ = s.dropRole(l)
		writeErrors(w, http.StatusServiceUnavailable, []string{"Vault is sealed"})
		return
	}
	l.timer = time.AfterFunc(role.DefaultTTL, func() { s.expire(id) })
	s.leases[id] = l
	s.mu.Unlock()
	s.logf("created role %s for lease %s", username, id)
	writeJSON(w, http.StatusOK, response{RequestID: randomUUID(), LeaseID: id, Renewable: true,
		LeaseDuration: int(role.DefaultTTL / time.Second),
		Data:          map[string]any{"username": username, "password": password}})
}

func (s *Server) expire(id string) {
	s.mu.Lock()
	l, ok := s.leases[id]
	if ok && time.Now().Before(l.Expire) { // renewed meanwhile
		ok = false
	}
	if ok && s.closed {
		ok = false
	}
	if ok {
		delete(s.leases, id)
		s.bg.Add(1)
	}
	s.mu.Unlock()
	if ok {
		defer s.bg.Done()
		s.logf("lease %s expired", id)
		_ = s.dropRole(l)
	}
}

func (s *Server) dropRole(l *lease) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := s.runStatements(ctx, l.role.RevocationStatements, l.Username, "", time.Time{})
	if err != nil {
		s.logf("revoking %s: %v", l.ID, err)
	} else {
		s.logf("dropped role %s (lease %s)", l.Username, l.ID)
	}
	return err
}

func (s *Server) runStatements(ctx context.Context, stmts []string, name, password string, exp time.Time) error {
	if s.opts.Exec == nil {
		return nil
	}
	r := strings.NewReplacer("{{name}}", name, "{{username}}", name, "{{password}}", password,
		"{{expiration}}", exp.UTC().Format("2006-01-02 15:04:05-0700"))
	for _, st := range stmts {
		if err := s.opts.Exec(ctx, r.Replace(st)); err != nil {
			// The driver's error may quote the statement, password and all.
			return fmt.Errorf("statement failed: %s", sanitize(err.Error(), password))
		}
	}
	return nil
}

func sanitize(msg, secret string) string {
	if secret == "" {
		return msg
	}
	return strings.ReplaceAll(msg, secret, "[REDACTED]")
}

func (s *Server) readKV(w http.ResponseWriter, r *http.Request, mount, path string) {
	version := 0
	if v := r.URL.Query().Get("version"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			writeErrors(w, http.StatusBadRequest, []string{"invalid version"})
			return
		}
		version = n
	}
	s.mu.Lock()
	versions := s.kv[mount][path]
	if version == 0 {
		version = len(versions)
	}
	if version == 0 || version > len(versions) {
		s.mu.Unlock()
		writeErrors(w, http.StatusNotFound, nil)
		return
	}
	v := versions[version-1]
	data := make(map[string]any, len(v.data))
	for k, x := range v.data {
		data[k] = x
	}
	s.mu.Unlock()
	writeJSON(w, http.StatusOK, response{RequestID: randomUUID(), Data: map[string]any{
		"data":     data,
		"metadata": kvMetadata(v, version),
	}})
}

func kvMetadata(v kvVersion, version int) map[string]any {
	return map[string]any{
		"created_time":    v.created.Format(time.RFC3339Nano),
		"custom_metadata": nil,
		"deletion_time":   "",
		"destroyed":       false,
		"version":         version,
	}
}

func (s *Server) writeKV(w http.ResponseWriter, r *http.Request, mount, path string) {
	var body struct {
		Data map[string]any `json:"data"`
	}
	if err := json.NewDecoder(io.LimitReader(r.Body, 1<<20)).Decode(&body); err != nil {
		writeErrors(w, http.StatusBadRequest, []string{"failed to parse JSON input: " + err.Error()})
		return
	}
	if body.Data == nil {
		writeErrors(w, http.StatusBadRequest, []string{"no data provided"})
		return
	}
	s.mu.Lock()
	n := s.putKV(mount, path, body.Data)
	v := s.kv[mount][path][n-1]
	s.mu.Unlock()
	writeJSON(w, http.StatusOK, response{RequestID: randomUUID(), Data: kvMetadata(v, n)})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// writeErrors answers like Vault does: {"errors":[…]}.
func writeErrors(w http.ResponseWriter, status int, errs []string) {
	if errs == nil {
		switch status {
		case http.StatusNotFound:
			errs = []string{}
		case http.StatusForbidden:
			errs = []string{"permission denied"}
		case http.StatusTooManyRequests:
			errs = []string{"request path \"\": rate limit quota exceeded"}
		case http.StatusServiceUnavailable:
			errs = []string{"Vault is unavailable"}
		default:
			errs = []string{strings.ToLower(http.StatusText(status))}
		}
	}
	writeJSON(w, status, map[string]any{"errors": errs})
}

const alnum = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

func randomString(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	for i := range b {
		b[i] = alnum[int(b[i])%len(alnum)]
	}
	return string(b)
}

func randomUUID() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}
