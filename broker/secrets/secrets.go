package secrets

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
)

// Secret is a string that never prints: String, GoString, LogValue, MarshalJSON
// and MarshalText all redact it. Use Reveal at the one place the value is needed.
type Secret struct{ v string }

// NewSecret wraps s.
func NewSecret(s string) Secret { return Secret{v: s} }

// Reveal returns the secret value. Call it only where the value is handed to
// the upstream authentication.
func (s Secret) Reveal() string { return s.v }

// Empty reports whether the secret is empty.
func (s Secret) Empty() bool { return s.v == "" }

const redacted = "[REDACTED]"

func (Secret) String() string               { return redacted }
func (Secret) GoString() string             { return redacted }
func (Secret) LogValue() slog.Value         { return slog.StringValue(redacted) }
func (Secret) MarshalJSON() ([]byte, error) { return []byte(`"` + redacted + `"`), nil }
func (Secret) MarshalText() ([]byte, error) { return []byte(redacted), nil }

// Format makes every fmt verb (%v, %+v, %#v, %s, %q, %x) print the redaction.
func (Secret) Format(f fmt.State, verb rune) { _, _ = f.Write([]byte(redacted)) }

// Credential is what the broker authenticates upstream with.
type Credential struct {
	// User is the upstream login role. Empty means the role the client asked for.
	User     string
	Password Secret
	// Cert, when non-nil, is the TLS client certificate and key presented
	// to upstreams whose auth list has cert.
	Cert *ClientCert
	// Lease, when non-nil, is the lifetime of a dynamic credential. Sessions
	// authenticated with it end when Done is closed.
	Lease *Lease
}

// Lease ties sessions to the lifetime of a dynamic credential.
type Lease struct {
	ID string // lease id; not secret, but not a metric label either
	// Done is closed when the lease expired or was revoked; Reason says why.
	Done   <-chan struct{}
	Reason func() string
	// Release is called once by each session that used the credential, when it
	// ends. The source may revoke the lease when its last user releases it.
	Release func()
}

// Source fetches the credential for a role on an upstream. Implementations
// must be safe for concurrent use and must never put the secret in an error.
type Source interface {
	Fetch(ctx context.Context, upstream, role string) (Credential, error)
}

// SourceFunc adapts a function to Source.
type SourceFunc func(ctx context.Context, upstream, role string) (Credential, error)

// Fetch calls f.
func (f SourceFunc) Fetch(ctx context.Context, upstream, role string) (Credential, error) {
	return f(ctx, upstream, role)
}

// ErrNotFound is returned (wrapped) when the backend has no credential for the
// (upstream, role). The broker reports it as a backend problem, not as an
// authorization failure: authorization was decided before the fetch.
var ErrNotFound = errors.New("no credential stored")

// ErrUnavailable is returned (wrapped) when the backend cannot be reached or
// cannot answer now (down, sealed, timed out).
var ErrUnavailable = errors.New("secrets backend unavailable")

// ErrCertExpired is returned (wrapped, with ErrUnavailable) when the
// role's client certificate expired and the backend could not issue a new
// one: new sessions are refused until it can.
var ErrCertExpired = errors.New("client certificate expired and not renewed")

// ErrDenied is returned (wrapped) when the backend refused pgward's own
// credentials or policy (permission denied).
var ErrDenied = errors.New("secrets backend denied access")

// Backends names the secrets backends a configuration may choose
// (secrets.backend, upstreams.<name>.secrets, audit.checkpoint.key.backend);
// the agent opens them by these names. DefaultBackend is the one used when
// none is named.
var Backends = []string{"file", "env", "vault"}

// DefaultBackend is secrets.backend when unset.
const DefaultBackend = "file"
