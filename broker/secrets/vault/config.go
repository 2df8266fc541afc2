package vault

import (
	"errors"
	"fmt"
	"net/url"
	"sort"
	"strings"
	"time"

	"github.com/pgward/pgward/broker"
)

// Config is the Vault backend's configuration, the `secrets.vault` section of
// pgward's configuration file. Durations are Go duration strings ("5s").
type Config struct {
	// Address is Vault's base URL, such as https://vault.internal:8200.
	Address string `yaml:"address"`
	// CAFile is a PEM bundle to verify Vault's certificate with. Empty: the
	// system roots.
	CAFile string `yaml:"ca_file"`
	// Timeout bounds every request to Vault, retries included (default 5s).
	Timeout time.Duration `yaml:"timeout"`
	// Auth is how pgward logs in to Vault.
	Auth AuthConfig `yaml:"auth"`
	// CacheTTL is how long a static (KV) secret is served from memory before
	// it is read again (default 1m). Dynamic credentials live as long as
	// their lease.
	CacheTTL time.Duration `yaml:"cache_ttl"`
	// LeaseCheckInterval is how often a dynamic credential's lease is looked
	// up while it is held, to notice a revocation or a shortened TTL made in
	// Vault (default 10s, at least 1s).
	LeaseCheckInterval time.Duration `yaml:"lease_check_interval"`
	// LeaseLinger is how long a dynamic credential is kept after its last
	// session released it, for the next session to reuse, before its lease is
	// revoked (default 30s; 0 keeps the default, a negative value revokes at
	// once).
	LeaseLinger time.Duration `yaml:"lease_linger"`
	// Roles maps upstream name → role name → where its credential lives.
	Roles map[string]map[string]RoleConfig `yaml:"roles"`
}

// AuthConfig says how pgward authenticates to Vault.
type AuthConfig struct {
	// Method is token, approle or kubernetes.
	Method string `yaml:"method"`
	// TokenFile holds the Vault token (method token). It is read at start and
	// again whenever the token stops working, so an external agent may
	// rotate it.
	TokenFile string `yaml:"token_file"`
	// RoleID is the AppRole role_id (method approle; not a secret).
	RoleID string `yaml:"role_id"`
	// SecretIDFile holds the AppRole secret_id (method approle), read at
	// every login.
	SecretIDFile string `yaml:"secret_id_file"`
	// Role is the Vault role to log in as (method kubernetes).
	Role string `yaml:"role"`
	// JWTFile is the service account token (method kubernetes), read at
	// every login. Default /var/run/secrets/kubernetes.io/serviceaccount/token.
	JWTFile string `yaml:"jwt_file"`
	// Mount is the auth method's mount path (default: the method's name,
	// "approle" or "kubernetes").
	Mount string `yaml:"mount"`
}

// RoleConfig says where one role's credential lives: exactly one of KV,
// Database and PKI.
type RoleConfig struct {
	// KV is a static password in a KV version 2 secret.
	KV *KVConfig `yaml:"kv"`
	// Database is a dynamic login issued by Vault's database secrets engine.
	Database *DatabaseConfig `yaml:"database"`
	// PKI is a short-lived client certificate issued by Vault's PKI
	// secrets engine, for upstreams with auth [cert] (pki.go).
	PKI *PKIConfig `yaml:"pki"`
}

// KVConfig locates a static credential in a KV version 2 engine.
type KVConfig struct {
	// Mount is the engine's mount path (default "secret").
	Mount string `yaml:"mount"`
	// Path is the secret's path inside the mount, without "data/".
	Path string `yaml:"path"`
	// Field is the key holding the password (default "password").
	Field string `yaml:"field"`
	// UserField, when set, is the key holding the upstream login name; by
	// default the login is the role the client asked for.
	UserField string `yaml:"user_field"`
	// Version pins a secret version; 0 reads the latest.
	Version int `yaml:"version"`
}

// DatabaseConfig names a role of Vault's database secrets engine.
type DatabaseConfig struct {
	// Mount is the engine's mount path (default "database").
	Mount string `yaml:"mount"`
	// Role is the engine's role (default: the pgward role's name).
	Role string `yaml:"role"`
}

// Auth methods.
const (
	MethodToken      = "token"
	MethodAppRole    = "approle"
	MethodKubernetes = "kubernetes"
)

// DefaultJWTFile is where Kubernetes mounts a pod's service account token.
const DefaultJWTFile = "/var/run/secrets/kubernetes.io/serviceaccount/token"

// Defaults of the unset keys (docs/vault.md).
const (
	DefaultTimeout            = 5 * time.Second
	DefaultCacheTTL           = time.Minute
	DefaultLeaseCheckInterval = 10 * time.Second
	DefaultLeaseLinger        = 30 * time.Second
	DefaultKVMount            = "secret"
	DefaultKVField            = "password"
	DefaultDatabaseMount      = "database"
)

func (c Config) timeout() time.Duration {
	if c.Timeout > 0 {
		return c.Timeout
	}
	return DefaultTimeout
}

func (c Config) cacheTTL() time.Duration {
	if c.CacheTTL > 0 {
		return c.CacheTTL
	}
	return DefaultCacheTTL
}

func (c Config) leaseCheckInterval() time.Duration {
	if c.LeaseCheckInterval > 0 {
		return c.LeaseCheckInterval
	}
	return DefaultLeaseCheckInterval
}

func (c Config) leaseLinger() time.Duration {
	switch {
	case c.LeaseLinger < 0:
		return 0
	case c.LeaseLinger == 0:
		return DefaultLeaseLinger
	}
	return c.LeaseLinger
}

func (a AuthConfig) mount() string {
	if a.Mount != "" {
		return strings.Trim(a.Mount, "/")
	}
	return a.Method
}

func (a AuthConfig) jwtFile() string {
	if a.JWTFile != "" {
		return a.JWTFile
	}
	return DefaultJWTFile
}

func (k KVConfig) mount() string {
	if k.Mount != "" {
		return strings.Trim(k.Mount, "/")
	}
	return DefaultKVMount
}

func (k KVConfig) field() string {
	if k.Field != "" {
		return k.Field
	}
	return DefaultKVField
}

func (d DatabaseConfig) mount() string {
	if d.Mount != "" {
		return strings.Trim(d.Mount, "/")
	}
	return DefaultDatabaseMount
}

func (d DatabaseConfig) role(pgwardRole string) string {
	if d.Role != "" {
		return d.Role
	}
	return pgwardRole
}

// Validate reports every problem in the configuration, each a
// *broker.FieldError whose path is relative to the vault section (the agent
// puts it under secrets.vault).
func (c Config) Validate() error {
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, &broker.FieldError{Path: key, Err: fmt.Errorf(format, args...)})
	}
	if c.Address == "" {
		bad("address", "required")
	} else if u, err := url.Parse(c.Address); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		bad("address", "%q is not an http(s) URL such as https://vault.internal:8200", c.Address)
	}
	if c.Timeout < 0 {
		bad("timeout", "must not be negative")
	}
	if c.CacheTTL < 0 {
		bad("cache_ttl", "must not be negative")
	}
	if c.LeaseCheckInterval < 0 || (c.LeaseCheckInterval > 0 && c.LeaseCheckInterval < time.Second) {
		bad("lease_check_interval", "must be at least 1s")
	}
	a := c.Auth
	switch a.Method {
	case MethodToken:
		if a.TokenFile == "" {
			bad("auth.token_file", "required for method token")
		}
	case MethodAppRole:
		if a.RoleID == "" {
			bad("auth.role_id", "required for method approle")
		}
		if a.SecretIDFile == "" {
			bad("auth.secret_id_file", "required for method approle")
		}
	case MethodKubernetes:
		if a.Role == "" {
			bad("auth.role", "required for method kubernetes")
		}
	case "":
		bad("auth.method", "required: token, approle or kubernetes")
	default:
		bad("auth.method", "%q is not token, approle or kubernetes", a.Method)
	}
	if a.Method != MethodToken && a.TokenFile != "" {
		bad("auth.token_file", "only used with method token")
	}
	if a.Method != MethodAppRole && (a.RoleID != "" || a.SecretIDFile != "") {
		bad("auth.role_id", "role_id and secret_id_file are only used with method approle")
	}
	if a.Method != MethodKubernetes && (a.Role != "" || a.JWTFile != "") {
		bad("auth.role", "role and jwt_file are only used with method kubernetes")
	}
	if a.Method == MethodToken && a.Mount != "" {
		bad("auth.mount", "not used with method token")
	}
	if len(c.Roles) == 0 {
		bad("roles", "no roles: map at least one upstream role to a Vault secret")
	}
	for _, up := range sortedKeys(c.Roles) {
		if len(c.Roles[up]) == 0 {
			bad("roles."+up, "no roles")
		}
		for _, role := range sortedKeys(c.Roles[up]) {
			r := c.Roles[up][role]
			key := "roles." + up + "." + role
			n := 0
			for _, set := range []bool{r.KV != nil, r.Database != nil, r.PKI != nil} {
				if set {
					n++
				}
			}
			switch {
			case n == 0:
				bad(key, "needs kv, database or pki")
			case n > 1:
				bad(key, "has more than one of kv, database and pki; choose one")
			case r.PKI != nil:
				r.PKI.validate(key+".pki", bad)
			case r.KV != nil:
				if strings.Trim(r.KV.Path, "/") == "" {
					bad(key+".kv.path", "required")
				}
				if strings.HasPrefix(strings.TrimPrefix(r.KV.Path, "/"), "data/") {
					bad(key+".kv.path", "%q: give the path inside the mount, without data/", r.KV.Path)
				}
				if r.KV.Version < 0 {
					bad(key+".kv.version", "must not be negative")
				}
			}
		}
	}
	return errors.Join(errs...)
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
