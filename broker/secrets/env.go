package secrets

import (
	"context"
	"fmt"
	"os"
	"strings"
)

// EnvConfig configures the env backend.
type EnvConfig struct {
	// Prefix of the variables. The password of role R on upstream U is in
	// <Prefix><U>_<R>, upper-cased, with every character that is not a
	// letter or digit replaced by '_'. Default "PGWARD_SECRET_".
	Prefix string `yaml:"prefix"`
}

// DefaultEnvPrefix is secrets.env.prefix when unset.
const DefaultEnvPrefix = "PGWARD_SECRET_"

// Env reads credentials from environment variables (for containers whose
// orchestrator injects secrets that way).
type Env struct {
	prefix string
	lookup func(string) (string, bool)
}

// NewEnv returns the env backend.
func NewEnv(cfg EnvConfig) *Env {
	p := cfg.Prefix
	if p == "" {
		p = DefaultEnvPrefix
	}
	return &Env{prefix: p, lookup: os.LookupEnv}
}

// VarName is the variable holding the password of role on upstream.
func (e *Env) VarName(upstream, role string) string {
	return e.prefix + envPart(upstream) + "_" + envPart(role)
}

func envPart(s string) string {
	return strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z':
			return r - 'a' + 'A'
		case r >= 'A' && r <= 'Z', r >= '0' && r <= '9':
			return r
		}
		return '_'
	}, s)
}

// Fetch returns the credential for role on upstream.
func (e *Env) Fetch(_ context.Context, upstream, role string) (Credential, error) {
	name := e.VarName(upstream, role)
	v, ok := e.lookup(name)
	if !ok || v == "" {
		return Credential{}, fmt.Errorf("environment variable %s: %w", name, ErrNotFound)
	}
	return Credential{Password: NewSecret(v)}, nil
}
