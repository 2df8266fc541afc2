package agent

import (
	"reflect"
	"regexp"
	"slices"
	"strings"

	"github.com/pgward/pgward/broker"
	"github.com/pgward/pgward/broker/secrets"
	"github.com/pgward/pgward/broker/secrets/vault"
	"github.com/pgward/pgward/exporter"
)

// ConfigKeys is every key of the configuration file, with its default and
// a line of documentation: the broker's part (broker.Keys) and the agent's
// (agentKeys). It is the one source of truth about keys:
//
//   - LoadConfig and New apply the defaults from it (Config.WithDefaults);
//   - the choices (OneOf) are the lists Validate checks against;
//   - TestConfigKeys holds it to the Go types (every field of Config has a
//     row, every row a field, every Default the field's type) and to
//     docs/config.md and docs/vault.md (every key documented with its
//     default and choices, every documented key in the table), and any
//     "`key` (default `x`)" in the other docs to its default.
//
// To add a key: the field (with its yaml tag) in the section's Go type, a
// row in agentKeys below (or in broker.Keys for listen, upstreams,
// principals, grants and limits), a row in docs/config.md; then run
// `go test ./agent/ -run TestConfigKeys`, which names whatever is missing.
func ConfigKeys() []broker.Key {
	return slices.Concat(broker.Keys, agentKeys)
}

var (
	durabilities = []string{string(exporter.DurabilityFsync), string(exporter.DurabilityWrite), string(exporter.DurabilityAsync)}
	paramModes   = []string{string(exporter.ParamsRedacted), string(exporter.ParamsFull), string(exporter.ParamsNone)}
	ebpfModes    = []string{"auto", "true", "false"}
	vaultMethods = []string{vault.MethodToken, vault.MethodAppRole, vault.MethodKubernetes}
)

const defaultEBPFMode = "auto"

// agentKeys are the keys of the sections the agent owns.
var agentKeys = []broker.Key{
	{Path: "secrets.backend", Default: secrets.DefaultBackend, OneOf: secrets.Backends, Doc: "the backend of upstreams that name none"},
	{Path: "secrets.file.path", DefaultDoc: "—", Doc: "the file backend's YAML file upstream → role → {password, user, cert, key, cert_file, key_file}"},
	{Path: "secrets.env.prefix", Default: secrets.DefaultEnvPrefix, Doc: "the env backend's variable prefix"},
	{Path: "secrets.vault.address", DefaultDoc: "required", Doc: "Vault's base URL"},
	{Path: "secrets.vault.ca_file", DefaultDoc: "system roots", Doc: "PEM bundle that signs Vault's certificate"},
	{Path: "secrets.vault.timeout", Default: vault.DefaultTimeout, Doc: "bound on every request to Vault"},
	{Path: "secrets.vault.cache_ttl", Default: vault.DefaultCacheTTL, Doc: "how long a KV password is served from memory"},
	{Path: "secrets.vault.lease_check_interval", Default: vault.DefaultLeaseCheckInterval, Doc: "how often a held dynamic lease is looked up"},
	{Path: "secrets.vault.lease_linger", Default: vault.DefaultLeaseLinger, Doc: "how long an unused dynamic lease is kept"},
	{Path: "secrets.vault.auth.method", DefaultDoc: "required", OneOf: vaultMethods, Doc: "how pgward logs in to Vault"},
	{Path: "secrets.vault.auth.token_file", DefaultDoc: "—", Doc: "token: file holding the Vault token"},
	{Path: "secrets.vault.auth.role_id", DefaultDoc: "—", Doc: "approle: the role_id"},
	{Path: "secrets.vault.auth.secret_id_file", DefaultDoc: "—", Doc: "approle: file holding the secret_id"},
	{Path: "secrets.vault.auth.role", DefaultDoc: "—", Doc: "kubernetes: the Vault role"},
	// Not applied: it is set only for method kubernetes.
	{Path: "secrets.vault.auth.jwt_file", DefaultDoc: vault.DefaultJWTFile, Doc: "kubernetes: the service account token"},
	{Path: "secrets.vault.auth.mount", DefaultDoc: "the method's name", Doc: "mount path of the auth method"},
	{Path: "secrets.vault.roles.<upstream>.<role>.kv.mount", Default: vault.DefaultKVMount, Doc: "KV v2 mount"},
	{Path: "secrets.vault.roles.<upstream>.<role>.kv.path", DefaultDoc: "required", Doc: "path inside the mount"},
	{Path: "secrets.vault.roles.<upstream>.<role>.kv.field", Default: vault.DefaultKVField, Doc: "the key holding the password"},
	{Path: "secrets.vault.roles.<upstream>.<role>.kv.user_field", DefaultDoc: "—", Doc: "a key holding the upstream login name"},
	{Path: "secrets.vault.roles.<upstream>.<role>.kv.version", Default: 0, DefaultDoc: "`0` (latest)", Doc: "pin a secret version"},
	{Path: "secrets.vault.roles.<upstream>.<role>.database.mount", Default: vault.DefaultDatabaseMount, Doc: "database secrets engine mount"},
	{Path: "secrets.vault.roles.<upstream>.<role>.database.role", DefaultDoc: "`<role>`", Doc: "the engine's role"},
	{Path: "secrets.vault.roles.<upstream>.<role>.pki.mount", Default: vault.DefaultPKIMount, Doc: "PKI secrets engine mount (client certificates, auth [cert])"},
	{Path: "secrets.vault.roles.<upstream>.<role>.pki.role", DefaultDoc: "`<role>`", Doc: "the engine's role: <mount>/issue/<role>"},
	{Path: "secrets.vault.roles.<upstream>.<role>.pki.common_name", DefaultDoc: "`<role>`", Doc: "the certificate's CN, the login role under cert authentication"},
	{Path: "secrets.vault.roles.<upstream>.<role>.pki.ttl", DefaultDoc: "the Vault role's `ttl`", Doc: "lifetime asked for"},

	{Path: "identity.require_ebpf", Default: false, Doc: "refuse connections no eBPF connect record matches"},

	{Path: "audit.path", DefaultDoc: "required", Doc: "the active JSON-lines file"},
	{Path: "audit.durability", Default: exporter.DurabilityWrite, OneOf: durabilities, Doc: "when an event counts as written"},
	{Path: "audit.parameters", Default: exporter.ParamsRedacted, OneOf: paramModes, Doc: "what of bound parameters is audited"},
	{Path: "audit.max_size", Default: int64(exporter.DefaultAuditMaxSize), Doc: "rotate at this size"},
	{Path: "audit.max_files", Default: exporter.DefaultAuditMaxFiles, Doc: "rotated files kept"},
	{Path: "audit.min_free_bytes", Default: int64(exporter.DefaultAuditMinFree), Doc: "free-space floor of the audit directory's file system"},
	{Path: "audit.checkpoint.every_lines", Default: exporter.DefaultCheckpointEveryLines, Doc: "a checkpoint after at most this many lines"},
	{Path: "audit.checkpoint.every", Default: exporter.DefaultCheckpointEvery, Doc: "a checkpoint at most this long after a line"},
	{Path: "audit.checkpoint.key.backend", DefaultDoc: "`secrets.backend`", OneOf: secrets.Backends, Doc: "the backend holding the signing key"},
	{Path: "audit.checkpoint.key.upstream", DefaultDoc: "required", Doc: "the key's name in the backend, as an upstream"},
	{Path: "audit.checkpoint.key.role", DefaultDoc: "required", Doc: "the key's name in the backend, as a role"},
	// audit.otlp: what is left empty falls back to OTEL_EXPORTER_OTLP_LOGS_*
	// and OTEL_EXPORTER_OTLP_* when the shipper starts, so only the keys
	// without such a variable get a Default here.
	{Path: "audit.otlp.endpoint", DefaultDoc: "`$OTEL_EXPORTER_OTLP_LOGS_ENDPOINT`", Doc: "host:port of the collector's OTLP receiver"},
	{Path: "audit.otlp.protocol", DefaultDoc: "`grpc`", OneOf: []string{exporter.ShipGRPC, exporter.ShipHTTP}, Doc: "OTLP over gRPC or HTTP/protobuf"},
	{Path: "audit.otlp.insecure", DefaultDoc: "`false`", Doc: "plain text instead of TLS"},
	{Path: "audit.otlp.headers", DefaultDoc: "none", Doc: "sent with every export; never logged"},
	{Path: "audit.otlp.ca_file", DefaultDoc: "system roots", Doc: "PEM CA that verifies the collector"},
	{Path: "audit.otlp.timeout", DefaultDoc: "`10s`", Doc: "one export attempt"},
	{Path: "audit.otlp.max_undelivered_bytes", Default: int64(exporter.DefaultShipMaxUndelivered), Doc: "cap on undelivered rotated files kept past max_files"},
	{Path: "audit.otlp.state_path", DefaultDoc: "`<audit.path>.ship`", Doc: "the delivery cursor"},

	{Path: "metrics.listen", Default: "", Doc: "host:port serving /metrics, /healthz, /readyz"},

	// Not applied: its default follows listen.unix_dir (Config.AdminSocket).
	{Path: "admin.socket", DefaultDoc: "`<listen.unix_dir>-admin/admin.sock`", Doc: "the admin API's Unix socket (pgward sessions), root only"},

	{Path: "ebpf.enabled", Default: defaultEBPFMode, OneOf: ebpfModes, Doc: "whether to use the kernel probes"},
	{Path: "ebpf.enforce", Default: false, Doc: "refuse direct connects to guarded endpoints"},
	{Path: "ebpf.guard", DefaultDoc: "`[]`", Doc: "endpoints to guard besides every upstream address"},
	{Path: "ebpf.cgroup", DefaultDoc: "cgroup2 root", Doc: "where the programs attach"},
	{Path: "ebpf.exempt", DefaultDoc: "`[]`", Doc: "cgroups of other pgward agents guarding the same endpoints"},

	{Path: "shutdown.grace", Default: DefaultGrace, Doc: "on SIGTERM, how long sessions may finish"},

	{Path: "kubernetes.enabled", Default: false, Doc: "watch this node's pods"},
	{Path: "kubernetes.node_name", DefaultDoc: "`$NODE_NAME`", Doc: "the node whose pods are watched"},
	{Path: "kubernetes.kubeconfig", Default: "", Doc: "a kubeconfig file; empty: in-cluster"},
	{Path: "kubernetes.lookup_wait", Default: DefaultLookupWait, Doc: "how long a connection from an unknown container waits for the watch"},
}

// WithDefaults returns a copy of c with every unset key that has a default
// in ConfigKeys set to it, the broker's defaults that depend on other keys
// (broker.Config.WithDefaults), and the backends that default to
// secrets.backend (upstreams.<name>.secrets, audit.checkpoint.key.backend)
// set to it. Sections that are absent (upstreams.<name>.reuse, secrets.vault,
// audit.checkpoint.key) stay absent. c is not modified.
func (c *Config) WithDefaults() *Config {
	defs := map[string]any{}
	for _, k := range ConfigKeys() {
		if k.Default != nil {
			defs[normPath(k.Path)] = k.Default
		}
	}
	out := withDefaults(reflect.ValueOf(*c), "", defs).Interface().(Config)
	out.Config = out.Config.WithDefaults()
	for name, u := range out.Upstreams {
		if u.Secrets == "" {
			u.Secrets = out.Secrets.Backend
			out.Upstreams[name] = u
		}
	}
	if k := out.Audit.Checkpoint.Key; k != nil && k.Backend == "" {
		k.Backend = out.Secrets.Backend
	}
	return &out
}

// withDefaults returns a deep copy of v (at key path path) with every zero
// leaf that defs has a default for set to it.
func withDefaults(v reflect.Value, path string, defs map[string]any) reflect.Value {
	t := v.Type()
	if isLeaf(t) {
		if d, ok := defs[path]; ok && v.IsZero() {
			return reflect.ValueOf(d).Convert(t)
		}
		return v
	}
	switch t.Kind() {
	case reflect.Pointer:
		if v.IsNil() {
			return v
		}
		n := reflect.New(t.Elem())
		n.Elem().Set(withDefaults(v.Elem(), path, defs))
		return n
	case reflect.Struct:
		n := reflect.New(t).Elem()
		n.Set(v)
		eachKeyField(t, path, func(i int, p string) { n.Field(i).Set(withDefaults(v.Field(i), p, defs)) })
		return n
	case reflect.Map:
		if v.IsNil() {
			return v
		}
		n := reflect.MakeMapWithSize(t, v.Len())
		for it := v.MapRange(); it.Next(); {
			n.SetMapIndex(it.Key(), withDefaults(it.Value(), path+".<>", defs))
		}
		return n
	case reflect.Slice:
		if v.IsNil() {
			return v
		}
		n := reflect.MakeSlice(t, v.Len(), v.Len())
		for i := 0; i < v.Len(); i++ {
			n.Index(i).Set(withDefaults(v.Index(i), path+"[]", defs))
		}
		return n
	}
	return v
}

// isLeaf reports whether a value of type t is one key's value rather than
// a section: scalars, lists of scalars, and maps of scalars (k8s.labels).
func isLeaf(t reflect.Type) bool {
	switch t.Kind() {
	case reflect.Pointer:
		return isLeaf(t.Elem())
	case reflect.Struct:
		return false
	case reflect.Slice, reflect.Map:
		return isLeaf(t.Elem())
	}
	return true
}

// yamlName is the key of a struct field in the file; "" for an inline
// field; ok false for a field that is not read from the file.
func yamlName(f reflect.StructField) (name string, ok bool) {
	tag := f.Tag.Get("yaml")
	if tag == "-" || (!f.IsExported() && !f.Anonymous) {
		return "", false
	}
	name, opts, _ := strings.Cut(tag, ",")
	if strings.Contains(opts, "inline") {
		return "", true
	}
	if name == "" {
		name = strings.ToLower(f.Name)
	}
	return name, true
}

// eachKeyField calls f with the index and key path of every field of
// struct type t that the file sets (an inline field's path is path).
func eachKeyField(t reflect.Type, path string, f func(i int, p string)) {
	for i := 0; i < t.NumField(); i++ {
		name, ok := yamlName(t.Field(i))
		if !ok {
			continue
		}
		p := path
		if name != "" {
			p = join(path, name)
		}
		f(i, p)
	}
}

// keyTypes maps every key path of type t (as normPath writes it) to the
// type of its value.
func keyTypes(t reflect.Type, path string, out map[string]reflect.Type) {
	if isLeaf(t) {
		out[path] = t
		return
	}
	switch t.Kind() {
	case reflect.Pointer:
		keyTypes(t.Elem(), path, out)
	case reflect.Struct:
		eachKeyField(t, path, func(i int, p string) { keyTypes(t.Field(i).Type, p, out) })
	case reflect.Map:
		keyTypes(t.Elem(), path+".<>", out)
	case reflect.Slice:
		keyTypes(t.Elem(), path+"[]", out)
	}
}

var placeholderRe = regexp.MustCompile(`<[^>]*>`)

// normPath writes every "<name>" of a key path as "<>", so that
// "upstreams.<name>.tls.mode" and "secrets.vault.roles.<upstream>.<role>.kv.path"
// compare with the paths keyTypes walks.
func normPath(p string) string { return placeholderRe.ReplaceAllString(p, "<>") }
