package broker

import (
	"errors"
	"fmt"
	"net"
	"path"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/pgward/pgward/broker/secrets"
)

// Config is the broker's part of pgward's configuration. The agent loads it
// from YAML (the yaml tags are the config keys of DESIGN.md §4); Validate
// reports every problem with its key path.
type Config struct {
	Listen     ListenConfig              `yaml:"listen"`
	Upstreams  map[string]UpstreamConfig `yaml:"upstreams"`
	Principals map[string]Principal      `yaml:"principals"`
	Grants     []Grant                   `yaml:"grants"`
	Limits     LimitsConfig              `yaml:"limits"`
}

// ListenConfig is where clients connect.
type ListenConfig struct {
	// UnixDir is the directory of the socket file <UnixDir>/.s.PGSQL.<Port>,
	// libpq's convention, so clients use host=<UnixDir>. Default /run/pgward.
	UnixDir string `yaml:"unix_dir"`
	// Port is the number in the socket file name (and nothing else). Default 5432.
	Port int `yaml:"port"`
	// Mode is the socket file's permission bits, octal. Default "0666": every
	// connection is identity-checked, so the socket may be open to all.
	Mode string `yaml:"mode"`
	// TCP is an optional loopback listener address (host:port). Its callers are
	// identified from eBPF records only.
	TCP string `yaml:"tcp"`
	// MaxConnections caps concurrent client connections (sessions and those
	// still in startup). Over it, clients get 53300. Default 10000.
	MaxConnections int `yaml:"max_connections"`
	// LoginTimeout bounds the time from accept to a relaying session
	// (startup, identity, credentials, upstream authentication). Default 10s.
	LoginTimeout time.Duration `yaml:"login_timeout"`
	// MaxMessageSize is the deprecated spelling of
	// limits.max_message_bytes: when only it is set, it is used as that
	// (and, like it, now caps only the messages pgward inspects). Setting
	// both to different values is an error.
	MaxMessageSize int `yaml:"max_message_size"`
	// EventLoop relays sessions on an epoll event loop (eventloop.go)
	// instead of a goroutine per direction. Off by default.
	EventLoop bool `yaml:"event_loop"`
	// EventLoopThreads is how many event loops (one locked OS thread
	// each) share the sessions, round robin; 0 means the default, 1.
	// Read when a listener starts.
	EventLoopThreads int `yaml:"event_loop_threads"`
	// EventLoopNice is the nice value of the event loops' threads
	// (-20..19; 0 leaves them as the process is). Read when a listener
	// starts.
	EventLoopNice int `yaml:"event_loop_nice"`
}

// UpstreamConfig is one Postgres server clients may use, by name.
type UpstreamConfig struct {
	// Address is host:port, or the path of a socket file such as
	// /var/run/postgresql/.s.PGSQL.5432.
	Address string `yaml:"address"`
	// Database is the real database name; defaults to the upstream's name.
	Database string    `yaml:"database"`
	TLS      TLSConfig `yaml:"tls"`
	// Auth lists the authentication methods pgward accepts from this upstream:
	// scram-sha-256 (default), md5, password, cert (client certificate over
	// verify-full TLS), trust (alone: no authentication). A method not listed
	// is refused, so a server (or a machine in the middle) cannot downgrade
	// to harvest the secret. See certauth.go.
	Auth []string `yaml:"auth"`
	// ConnectTimeout bounds dialling and authenticating. Default 5s.
	ConnectTimeout time.Duration `yaml:"connect_timeout"`
	// Secrets names the secrets backend holding this upstream's credentials
	// (file, env or vault); empty means secrets.backend. The agent routes on it.
	Secrets string `yaml:"secrets"`
	// Reuse, when set, parks idle upstream connections at session end (after
	// DISCARD ALL) for the next session of the same role and credential.
	// Off by default. See reuse.go and docs/config.md.
	Reuse *ReuseConfig `yaml:"reuse"`
	// RefuseRoleSwitching refuses sessions whose credential's role can
	// become another role (SET ROLE within its memberships, or any role as
	// a superuser), as learned when the credential is first used
	// (roles.go). Off by default: such credentials are reported (audit,
	// metric, WARN) and allowed.
	RefuseRoleSwitching bool `yaml:"refuse_role_switching"`
	// TrustNamedStatements forwards a Bind of a named statement to the
	// server's statement of that name, as the client sent it. Off by
	// default: pgward re-prepares the text it audited under a reserved name
	// and binds that (verify.go), because code running inside the server
	// can swap a named statement unseen. On, the audit can name a text the
	// server did not run (docs/security-model.md).
	TrustNamedStatements bool `yaml:"trust_named_statements"`
	// ApplicationName is the application_name pgward gives the upstream
	// session, a format with {app} (the client's own application_name),
	// {principal} and {request_id}; empty means
	// DefaultApplicationName. "{app}" passes the client's name through
	// unchanged. Cut to PostgreSQL's 63 bytes keeping {request_id} whole
	// (appname.go).
	ApplicationName string `yaml:"application_name"`
}

// DefaultApplicationName is upstreams.<name>.application_name when unset.
const DefaultApplicationName = "{app} pgward:{principal}:{request_id}"

func (u UpstreamConfig) applicationName() string {
	if u.ApplicationName == "" {
		return DefaultApplicationName
	}
	return u.ApplicationName
}

// ReuseConfig is upstreams.<name>.reuse.
type ReuseConfig struct {
	// MaxIdle bounds the parked connections per (upstream, role,
	// credential). Default 16.
	MaxIdle int `yaml:"max_idle"`
	// IdleTimeout closes a connection parked this long. Default 5m.
	IdleTimeout time.Duration `yaml:"idle_timeout"`
}

// Defaults of ReuseConfig.
const (
	DefaultReuseMaxIdle     = 16
	DefaultReuseIdleTimeout = 5 * time.Minute
)

func (r *ReuseConfig) maxIdle() int {
	if r.MaxIdle <= 0 {
		return DefaultReuseMaxIdle
	}
	return r.MaxIdle
}

func (r *ReuseConfig) idleTimeout() time.Duration {
	if r.IdleTimeout <= 0 {
		return DefaultReuseIdleTimeout
	}
	return r.IdleTimeout
}

// TLSConfig is how pgward talks TLS to an upstream.
type TLSConfig struct {
	// Mode is disable, require, verify-ca or verify-full (libpq's meanings,
	// without the fallbacks: require never falls back to plaintext).
	// Default disable for socket files, verify-full otherwise.
	Mode       string `yaml:"mode"`
	CAFile     string `yaml:"ca_file"`
	ServerName string `yaml:"server_name"` // defaults to the address's host
	CertFile   string `yaml:"cert_file"`   // client certificate, optional
	KeyFile    string `yaml:"key_file"`
}

// Principal is a named set of selectors over an Identity. Every selector
// given must match (and, within one selector, any of its values).
type Principal struct {
	Match Selectors `yaml:"match"`
}

// Selectors match an Identity. Unset selectors match anything; a principal
// with no selector at all is invalid.
type Selectors struct {
	UID               []uint32          `yaml:"uid"`
	GID               []uint32          `yaml:"gid"`
	User              StringList        `yaml:"user"`
	Exe               StringList        `yaml:"exe"`          // exact path or glob (path.Match)
	Comm              StringList        `yaml:"comm"`         // exact
	SystemdUnit       StringList        `yaml:"systemd_unit"` // exact or glob
	Cgroup            StringList        `yaml:"cgroup"`       // exact or glob over the cgroup path
	ContainerID       StringList        `yaml:"container_id"`
	K8sNamespace      StringList        `yaml:"k8s.namespace"`
	K8sServiceAccount StringList        `yaml:"k8s.service_account"`
	K8sPod            StringList        `yaml:"k8s.pod"`
	K8sLabels         map[string]string `yaml:"k8s.labels"`
}

// StringList is a list of strings that may be written as one scalar in YAML.
type StringList []string

// UnmarshalYAML accepts a scalar or a sequence (yaml.v2-style unmarshaler,
// which yaml.v3 honours, so this package needs no YAML import).
func (l *StringList) UnmarshalYAML(unmarshal func(any) error) error {
	var one string
	if err := unmarshal(&one); err == nil {
		*l = StringList{one}
		return nil
	}
	var many []string
	if err := unmarshal(&many); err != nil {
		return errors.New("must be a string or a list of strings")
	}
	*l = many
	return nil
}

// Grant gives a principal the use of roles on an upstream.
type Grant struct {
	Principal string   `yaml:"principal"`
	Upstream  string   `yaml:"upstream"`
	Roles     []string `yaml:"roles"`
}

// LimitsConfig throttles authentication per principal (per uid for callers
// that match no principal) and bounds the memory sessions may make pgward
// hold.
type LimitsConfig struct {
	AuthRate             float64 `yaml:"auth_rate"`              // requests per second; 0 = unlimited
	AuthBurst            int     `yaml:"auth_burst"`             // bucket size; default 2×rate
	SessionsPerPrincipal int     `yaml:"sessions_per_principal"` // 0 = unlimited
	// CancelWait bounds each of the two waits when pgward ends a session
	// with a statement running (grant revoked, lease ended, end of the
	// shutdown grace): after its CancelRequest for the statement's outcome,
	// then, if the statement still runs, after pg_terminate_backend for the
	// backend to go. Default 5s. See endsession.go.
	CancelWait time.Duration `yaml:"cancel_wait"`
	// MaxMessageBytes caps one message pgward must hold whole to inspect
	// it (from clients: Query, Parse, Bind, Execute, FunctionCall, Close,
	// Describe, Sync, Terminate; from the server: ErrorResponse,
	// CommandComplete, ParameterStatus…), counted on the wire (type byte,
	// length and body). Over it a client gets 54000, a server's message
	// ends the session. Messages pgward does not inspect (CopyData,
	// DataRow…) stream through whatever their size. Default 64 MiB; at
	// most 2 GiB, the protocol's own bound; never above BufferMemory.
	MaxMessageBytes int `yaml:"max_message_bytes"`
	// BufferMemory caps the bytes all sessions together hold in buffers
	// grown past the standard 32 KiB read buffer, to assemble messages to
	// inspect. A session whose message needs more than is left stops
	// reading until other sessions give memory back. Default 256 MiB.
	BufferMemory int64 `yaml:"buffer_memory"`
	// ConnectionsPerUID caps the connections of one uid that are still
	// logging in (accept to relaying); over it, 53300. Default
	// listen.max_connections/10 (at least 16). See slots.go.
	ConnectionsPerUID int `yaml:"connections_per_uid"`
	// ConnectionsPerCgroup is the same cap per cgroup (never the root
	// cgroup). 0 (default) is off: it costs a /proc read per connection.
	ConnectionsPerCgroup int `yaml:"connections_per_cgroup"`
}

// DefaultCancelWait is limits.cancel_wait when unset.
const DefaultCancelWait = 5 * time.Second

func (l LimitsConfig) cancelWait() time.Duration {
	if l.CancelWait <= 0 {
		return DefaultCancelWait
	}
	return l.CancelWait
}

// defaultLoginSlots is the default of limits.connections_per_uid and
// limits.connections_per_cgroup: a tenth of listen.max_connections, at
// least 16 (but never over max_connections).
func defaultLoginSlots(l ListenConfig) int {
	m := l.maxConnections()
	return min(m, max(16, m/10))
}

func (c LimitsConfig) connectionsPerUID(l ListenConfig) int {
	if c.ConnectionsPerUID > 0 {
		return c.ConnectionsPerUID
	}
	return defaultLoginSlots(l)
}

func (c LimitsConfig) connectionsPerCgroup() int { return c.ConnectionsPerCgroup }

// FieldError is a configuration problem at a key path such as
// "upstreams.orders.tls.mode". The agent adds the line number.
type FieldError struct {
	Path string
	Err  error
}

func (e *FieldError) Error() string { return e.Path + ": " + e.Err.Error() }
func (e *FieldError) Unwrap() error { return e.Err }

// Under returns err with every *FieldError in it (joined or not) moved
// under the key prefix: a section's own Validate names its keys relative to
// the section, and the caller knows where the section is.
func Under(prefix string, err error) error {
	if err == nil {
		return nil
	}
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		var errs []error
		for _, e := range j.Unwrap() {
			errs = append(errs, Under(prefix, e))
		}
		return errors.Join(errs...)
	}
	var fe *FieldError
	if !errors.As(err, &fe) {
		return &FieldError{Path: prefix, Err: err}
	}
	if fe.Path == "" {
		return &FieldError{Path: prefix, Err: fe.Err}
	}
	return &FieldError{Path: prefix + "." + fe.Path, Err: fe.Err}
}

func fieldErr(path, format string, args ...any) error {
	return &FieldError{Path: path, Err: fmt.Errorf(format, args...)}
}

// Defaults.
const (
	DefaultUnixDir         = "/run/pgward"
	DefaultPort            = 5432
	DefaultMode            = "0666"
	DefaultMaxConnections  = 10000
	DefaultLoginTimeout    = 10 * time.Second
	DefaultMaxMessageBytes = 64 << 20
	DefaultBufferMemory    = 256 << 20
	DefaultConnectTimeout  = 5 * time.Second
)

// Bounds of limits.max_message_bytes: the largest message the protocol can
// carry (type byte plus a length of 2^31-1), and a floor under which
// ordinary statements would not fit.
const (
	maxWireMessage  = 1 << 31
	minMessageBytes = 1 << 10
)

// SocketPath is the listener's socket file, <unix_dir>/.s.PGSQL.<port>.
func (c ListenConfig) SocketPath() string {
	return path.Join(c.unixDir(), ".s.PGSQL."+strconv.Itoa(c.port()))
}

func (c ListenConfig) unixDir() string {
	if c.UnixDir == "" {
		return DefaultUnixDir
	}
	return c.UnixDir
}

func (c ListenConfig) port() int {
	if c.Port == 0 {
		return DefaultPort
	}
	return c.Port
}

// FileMode is the socket's permission bits.
func (c ListenConfig) FileMode() uint32 {
	m := c.Mode
	if m == "" {
		m = DefaultMode
	}
	v, _ := strconv.ParseUint(m, 8, 32)
	return uint32(v)
}

func (c ListenConfig) maxConnections() int {
	if c.MaxConnections <= 0 {
		return DefaultMaxConnections
	}
	return c.MaxConnections
}

func (c ListenConfig) loginTimeout() time.Duration {
	if c.LoginTimeout <= 0 {
		return DefaultLoginTimeout
	}
	return c.LoginTimeout
}

// maxMessageBytes is limits.max_message_bytes, or its deprecated spelling
// listen.max_message_size, or the default.
func (c *Config) maxMessageBytes() int {
	switch {
	case c.Limits.MaxMessageBytes > 0:
		return c.Limits.MaxMessageBytes
	case c.Listen.MaxMessageSize > 0:
		return c.Listen.MaxMessageSize
	}
	return DefaultMaxMessageBytes
}

func (c LimitsConfig) bufferMemory() int64 {
	if c.BufferMemory <= 0 {
		return DefaultBufferMemory
	}
	return c.BufferMemory
}

// Deprecations lists the deprecated keys the configuration uses, with
// what to use instead, for the agent to log (they are not errors).
func (c *Config) Deprecations() []string {
	var out []string
	for _, w := range c.deprecations() {
		out = append(out, w.Path+" "+w.Err.Error())
	}
	return out
}

func (c *Config) deprecations() []*FieldError {
	var out []*FieldError
	if c.Listen.MaxMessageSize > 0 {
		out = append(out, &FieldError{Path: "listen.max_message_size", Err: errors.New("is deprecated: it is read as limits.max_message_bytes, which caps only the messages pgward inspects (COPY data and result rows stream through whatever their size); use limits.max_message_bytes")})
	}
	return out
}

// Warnings are what the server logs at WARN about c when it starts and at
// each reload — the deprecations, and each upstream whose auth list has
// trust — each as a *FieldError naming its key. `pgward check-config`
// prints them; they do not make c invalid.
func (c *Config) Warnings() []error {
	var out []error
	for _, w := range c.deprecations() {
		out = append(out, w)
	}
	for _, name := range sortedKeys(c.Upstreams) {
		if slices.Contains(c.Upstreams[name].Auth, AuthTrust) {
			out = append(out, &FieldError{Path: "upstreams." + name + ".auth", Err: errors.New(trustWarning)})
		}
	}
	return out
}

// WithDefaults returns a copy of c with the defaults that depend on other
// keys set: each upstream's database (its name), tls.mode (disable for a
// socket file, verify-full otherwise) and auth (scram-sha-256). The
// defaults that are one value are in Keys; the agent applies both when it
// loads a file. c is not modified.
func (c Config) WithDefaults() Config {
	if c.Upstreams != nil {
		ups := make(map[string]UpstreamConfig, len(c.Upstreams))
		for name, u := range c.Upstreams {
			u.Database = u.database(name)
			u.TLS.Mode = u.tlsMode()
			u.Auth = u.authMethods()
			ups[name] = u
		}
		c.Upstreams = ups
	}
	return c
}

// IsSocketPath reports whether the address names a Unix socket file.
func (u UpstreamConfig) IsSocketPath() bool { return strings.HasPrefix(u.Address, "/") }

func (u UpstreamConfig) tlsMode() string {
	if u.TLS.Mode != "" {
		return u.TLS.Mode
	}
	if u.IsSocketPath() {
		return "disable"
	}
	return "verify-full"
}

func (u UpstreamConfig) authMethods() []string {
	if len(u.Auth) == 0 {
		return []string{"scram-sha-256"}
	}
	return u.Auth
}

func (u UpstreamConfig) connectTimeout() time.Duration {
	if u.ConnectTimeout <= 0 {
		return DefaultConnectTimeout
	}
	return u.ConnectTimeout
}

func (u UpstreamConfig) database(name string) string {
	if u.Database != "" {
		return u.Database
	}
	return name
}

// Validate reports every problem in the configuration, joined.
func (c *Config) Validate() error {
	var errs []error
	add := func(err error) { errs = append(errs, err) }

	if c.Listen.Port < 0 || c.Listen.Port > 65535 {
		add(fieldErr("listen.port", "%d is not a port number (1-65535)", c.Listen.Port))
	}
	if c.Listen.UnixDir != "" && !strings.HasPrefix(c.Listen.UnixDir, "/") {
		add(fieldErr("listen.unix_dir", "%q must be an absolute path", c.Listen.UnixDir))
	}
	if len(c.Listen.SocketPath()) > 107 {
		add(fieldErr("listen.unix_dir", "socket path %q is longer than the 107 bytes a Unix socket path may have", c.Listen.SocketPath()))
	}
	if c.Listen.Mode != "" {
		if v, err := strconv.ParseUint(c.Listen.Mode, 8, 32); err != nil || v > 0o777 {
			add(fieldErr("listen.mode", "%q is not an octal permission such as \"0666\"", c.Listen.Mode))
		}
	}
	if c.Listen.TCP != "" {
		host, _, err := net.SplitHostPort(c.Listen.TCP)
		if err != nil {
			add(fieldErr("listen.tcp", "%q is not host:port: %w", c.Listen.TCP, err))
		} else if ip := net.ParseIP(host); host != "localhost" && (ip == nil || !ip.IsLoopback()) {
			add(fieldErr("listen.tcp", "%q is not a loopback address: the TCP listener identifies callers from this host's kernel only", c.Listen.TCP))
		}
	}
	if c.Listen.MaxConnections < 0 {
		add(fieldErr("listen.max_connections", "must not be negative"))
	}
	if n := c.Listen.EventLoopThreads; n < 0 || n > maxEventLoops {
		add(fieldErr("listen.event_loop_threads", "must be between 1 and %d (0: the default, 1)", maxEventLoops))
	}
	if n := c.Listen.EventLoopNice; n < -20 || n > 19 {
		add(fieldErr("listen.event_loop_nice", "must be between -20 and 19 (a nice value; 0: the process's own)"))
	}
	if c.Listen.MaxMessageSize < 0 || c.Listen.MaxMessageSize > maxWireMessage {
		add(fieldErr("listen.max_message_size", "must be between 0 (default) and %d", maxWireMessage))
	}
	if m := c.Limits.MaxMessageBytes; m != 0 && (m < minMessageBytes || m > maxWireMessage) {
		add(fieldErr("limits.max_message_bytes", "must be between %d and %d (the largest message the protocol can carry), or 0 for the default %d", minMessageBytes, maxWireMessage, DefaultMaxMessageBytes))
	}
	if a, m := c.Listen.MaxMessageSize, c.Limits.MaxMessageBytes; a > 0 && m > 0 && a != m {
		add(fieldErr("listen.max_message_size", "is the deprecated spelling of limits.max_message_bytes, and the two disagree (%d, %d): keep only limits.max_message_bytes", a, m))
	}
	if c.Limits.BufferMemory < 0 {
		add(fieldErr("limits.buffer_memory", "must not be negative"))
	} else if m := c.maxMessageBytes(); int64(m) > c.Limits.bufferMemory() {
		key := "limits.max_message_bytes"
		if c.Limits.MaxMessageBytes == 0 {
			key = "listen.max_message_size"
		}
		add(fieldErr("limits.buffer_memory", "%d is less than %s (%d): one message must fit in the buffer budget; raise limits.buffer_memory", c.Limits.bufferMemory(), key, m))
	}

	if len(c.Upstreams) == 0 {
		add(fieldErr("upstreams", "at least one upstream is needed"))
	}
	for _, name := range sortedKeys(c.Upstreams) {
		u := c.Upstreams[name]
		p := "upstreams." + name
		if u.Address == "" {
			add(fieldErr(p+".address", "is required (host:port or a socket file path)"))
		} else if !u.IsSocketPath() {
			if _, port, err := net.SplitHostPort(u.Address); err != nil || port == "" {
				add(fieldErr(p+".address", "%q is neither host:port nor an absolute socket file path", u.Address))
			}
		}
		if u.TLS.Mode != "" {
			add(CheckChoice(p+".tls.mode", u.TLS.Mode, TLSModes))
		}
		if m := u.tlsMode(); (m == "verify-ca" || m == "verify-full") && u.TLS.CAFile == "" {
			add(fieldErr(p+".tls.ca_file", "is required when tls.mode is %s", m))
		}
		if (u.TLS.CertFile == "") != (u.TLS.KeyFile == "") {
			add(fieldErr(p+".tls", "cert_file and key_file go together"))
		}
		if u.IsSocketPath() && u.tlsMode() != "disable" {
			add(fieldErr(p+".tls.mode", "TLS over a socket file is not supported; use disable"))
		}
		if u.Secrets != "" {
			add(CheckChoice(p+".secrets", u.Secrets, secrets.Backends))
		}
		if err := checkAppNameFormat(u.ApplicationName); err != nil {
			add(fieldErr(p+".application_name", "%s", err))
		}
		if r := u.Reuse; r != nil && (r.MaxIdle < 0 || r.IdleTimeout < 0) {
			add(fieldErr(p+".reuse", "max_idle and idle_timeout must not be negative"))
		}
		for i, m := range u.Auth {
			add(CheckChoice(fmt.Sprintf("%s.auth[%d]", p, i), m, AuthMethods))
		}
		checkAuth(p, u, add) // certauth.go
	}

	for _, name := range sortedKeys(c.Principals) {
		pr := c.Principals[name]
		p := "principals." + name
		if !pr.Match.any() {
			add(fieldErr(p+".match", "a principal needs at least one selector, or it would match every process"))
		}
		for _, g := range [][]string{pr.Match.Exe, pr.Match.SystemdUnit, pr.Match.Cgroup} {
			for _, pat := range g {
				if _, err := path.Match(pat, ""); err != nil {
					add(fieldErr(p+".match", "bad pattern %q: %w", pat, err))
				}
			}
		}
	}
	for i, g := range c.Grants {
		p := fmt.Sprintf("grants[%d]", i)
		if _, ok := c.Principals[g.Principal]; !ok {
			add(fieldErr(p+".principal", "%q is not a defined principal", g.Principal))
		}
		if _, ok := c.Upstreams[g.Upstream]; !ok {
			add(fieldErr(p+".upstream", "%q is not a defined upstream", g.Upstream))
		}
		if len(g.Roles) == 0 {
			add(fieldErr(p+".roles", "at least one role is needed"))
		}
	}
	if c.Limits.AuthRate < 0 || c.Limits.AuthBurst < 0 || c.Limits.SessionsPerPrincipal < 0 || c.Limits.CancelWait < 0 ||
		c.Limits.ConnectionsPerUID < 0 || c.Limits.ConnectionsPerCgroup < 0 {
		add(fieldErr("limits", "limits must not be negative"))
	}
	return errors.Join(errs...)
}

// CheckChoice is nil when v is one of choices, else a *FieldError at path
// that lists them.
func CheckChoice(path, v string, choices []string) error {
	if slices.Contains(choices, v) {
		return nil
	}
	return fieldErr(path, "%q is not one of %s", v, strings.Join(choices, ", "))
}

func (s Selectors) any() bool {
	return len(s.UID) > 0 || len(s.GID) > 0 || len(s.User) > 0 || len(s.Exe) > 0 || len(s.Comm) > 0 ||
		len(s.SystemdUnit) > 0 || len(s.Cgroup) > 0 || len(s.ContainerID) > 0 || len(s.K8sNamespace) > 0 ||
		len(s.K8sServiceAccount) > 0 || len(s.K8sPod) > 0 || len(s.K8sLabels) > 0
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
