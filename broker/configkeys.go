package broker

import "github.com/pgward/pgward/broker/secrets"

// A Key is one key of pgward's configuration file: the table of them is
// the single source of truth for names, defaults and documentation. The
// agent joins the broker's part (Keys) with its own, applies the defaults
// from it when it loads a file, and a test holds docs/config.md and the
// Go types to it in both directions.
type Key struct {
	// Path is the key as docs/config.md writes it, from the top of the
	// file: "listen.port", "upstreams.<name>.tls.mode", "grants[].roles".
	// "<…>" stands for a name the operator chooses, "[]" for a list item.
	Path string
	// Default is the value a zero (unset) key takes, of the field's type
	// (a named constant, so the code that falls back to it for a Config
	// built in Go uses the same value). nil: no single value — see
	// DefaultDoc.
	Default any
	// DefaultDoc is how the docs write a default that is not one value
	// ("2 × rate", "`secrets.backend`", "required"); when set, the docs'
	// default column must contain it instead of Default.
	DefaultDoc string
	// OneOf lists the values a choice accepts; the docs name each.
	OneOf []string
	// Doc says in one line what the key does.
	Doc string
}

// Choices the configuration accepts. Validate and the Keys table both use
// these lists, so a value is added in one place.
var (
	TLSModes    = []string{"disable", "require", "verify-ca", "verify-full"}
	AuthMethods = []string{"scram-sha-256", "md5", "password", AuthCert, AuthTrust}
)

// Keys is the broker's part of the configuration (listen, upstreams,
// principals, grants, limits). To add a key: a field with its yaml tag in
// config.go, its row here (and in docs/config.md); TestConfigKeys in
// agent/configkeys_test.go fails until the three agree.
var Keys = []Key{
	{Path: "listen.unix_dir", Default: DefaultUnixDir, Doc: "directory of the socket file <unix_dir>/.s.PGSQL.<port>"},
	{Path: "listen.port", Default: DefaultPort, Doc: "the number in the socket file's name (libpq's convention)"},
	{Path: "listen.mode", Default: DefaultMode, Doc: "permission bits of the socket file, octal"},
	{Path: "listen.tcp", Default: "", Doc: "optional loopback TCP listener, callers identified from eBPF only"},
	{Path: "listen.max_connections", Default: DefaultMaxConnections, Doc: "client connections at once; over it 53300"},
	{Path: "listen.login_timeout", Default: DefaultLoginTimeout, Doc: "from accept to a relaying session"},
	{Path: "listen.event_loop", Default: false, Doc: "relay sessions on one epoll event loop instead of a goroutine per direction (plain Unix/TCP sockets; TLS upstreams keep the goroutines)"},
	{Path: "listen.event_loop_threads", Default: 1, Doc: "how many event loops (one locked OS thread each) share the sessions, round robin; more lowers the tail latency of hundreds of busy sessions and costs CPU per statement"},
	{Path: "listen.event_loop_nice", Default: 0, Doc: "nice value of the event loops' threads (-20..19; 0: the process's own); a negative value keeps hundreds of busy sessions' tail latency down and needs CAP_SYS_NICE or RLIMIT_NICE"},
	{Path: "listen.max_message_size", DefaultDoc: "—", Doc: "deprecated spelling of limits.max_message_bytes"},

	{Path: "upstreams.<name>.address", DefaultDoc: "required", Doc: "host:port, or a socket file path"},
	{Path: "upstreams.<name>.database", DefaultDoc: "`<name>`", Doc: "the real database name upstream"},
	{Path: "upstreams.<name>.tls.mode", DefaultDoc: "`verify-full` (`disable` for socket files)", OneOf: TLSModes, Doc: "TLS to the upstream"},
	{Path: "upstreams.<name>.tls.ca_file", DefaultDoc: "—", Doc: "CA bundle; required for verify-ca and verify-full"},
	{Path: "upstreams.<name>.tls.server_name", DefaultDoc: "host of `address`", Doc: "name to verify"},
	{Path: "upstreams.<name>.tls.cert_file", DefaultDoc: "—", Doc: "client certificate"},
	{Path: "upstreams.<name>.tls.key_file", DefaultDoc: "—", Doc: "client certificate's key"},
	{Path: "upstreams.<name>.auth", DefaultDoc: "`[scram-sha-256]`", OneOf: AuthMethods, Doc: "methods pgward accepts from this server (cert: client certificate over verify-full TLS; trust: alone, no authentication; certauth.go)"},
	{Path: "upstreams.<name>.connect_timeout", Default: DefaultConnectTimeout, Doc: "dial and authenticate"},
	{Path: "upstreams.<name>.secrets", DefaultDoc: "`secrets.backend`", OneOf: secrets.Backends, Doc: "the backend holding this upstream's credentials"},
	{Path: "upstreams.<name>.refuse_role_switching", Default: false, Doc: "refuse credentials whose role can become another role"},
	{Path: "upstreams.<name>.trust_named_statements", Default: false, Doc: "bind named statements by name instead of re-preparing the audited text (faster; the audit can then miss a statement swapped by code in the server)"},
	{Path: "upstreams.<name>.application_name", Default: DefaultApplicationName, Doc: "the upstream session's application_name, a format"},
	{Path: "upstreams.<name>.reuse.max_idle", Default: DefaultReuseMaxIdle, Doc: "idle upstream connections parked per (upstream, role, credential)"},
	{Path: "upstreams.<name>.reuse.idle_timeout", Default: DefaultReuseIdleTimeout, Doc: "a parked connection is closed after this long"},

	{Path: "principals.<name>.match.uid", DefaultDoc: "—", Doc: "the caller's effective uid at connect()"},
	{Path: "principals.<name>.match.gid", DefaultDoc: "—", Doc: "the caller's effective gid at connect()"},
	{Path: "principals.<name>.match.user", DefaultDoc: "—", Doc: "user names of the uid"},
	{Path: "principals.<name>.match.exe", DefaultDoc: "—", Doc: "executable path, exact or glob"},
	{Path: "principals.<name>.match.comm", DefaultDoc: "—", Doc: "task name"},
	{Path: "principals.<name>.match.systemd_unit", DefaultDoc: "—", Doc: "innermost systemd unit, exact or glob"},
	{Path: "principals.<name>.match.cgroup", DefaultDoc: "—", Doc: "cgroup path, exact or glob"},
	{Path: "principals.<name>.match.container_id", DefaultDoc: "—", Doc: "container id from the cgroup path"},
	{Path: "principals.<name>.match.k8s.namespace", DefaultDoc: "—", Doc: "the caller's pod's namespace"},
	{Path: "principals.<name>.match.k8s.service_account", DefaultDoc: "—", Doc: "the caller's pod's service account"},
	{Path: "principals.<name>.match.k8s.pod", DefaultDoc: "—", Doc: "the caller's pod's name, exact or glob"},
	{Path: "principals.<name>.match.k8s.labels", DefaultDoc: "—", Doc: "labels the caller's pod must carry"},

	{Path: "grants[].principal", DefaultDoc: "required", Doc: "the principal granted"},
	{Path: "grants[].upstream", DefaultDoc: "required", Doc: "the upstream it may use"},
	{Path: "grants[].roles", DefaultDoc: "required", Doc: "the roles it may use there; \"*\" is every role"},

	{Path: "limits.auth_rate", Default: float64(0), DefaultDoc: "0 (off)", Doc: "authentication requests per second per principal"},
	{Path: "limits.auth_burst", DefaultDoc: "2 × rate", Doc: "bucket size"},
	{Path: "limits.sessions_per_principal", Default: 0, DefaultDoc: "0 (off)", Doc: "concurrent sessions per principal"},
	{Path: "limits.cancel_wait", Default: DefaultCancelWait, Doc: "each wait when pgward ends a session with a statement running"},
	{Path: "limits.max_message_bytes", DefaultDoc: "`67108864` (64 MiB)", Doc: "the largest message pgward holds whole to inspect it"},
	{Path: "limits.buffer_memory", Default: int64(DefaultBufferMemory), Doc: "bytes all sessions together may hold in grown buffers"},
	{Path: "limits.connections_per_uid", DefaultDoc: "`listen.max_connections`/10, at least 16", Doc: "connections of one uid still logging in"},
	{Path: "limits.connections_per_cgroup", Default: 0, DefaultDoc: "0 (off)", Doc: "the same per cgroup path"},
}
