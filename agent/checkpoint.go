package agent

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/pgward/pgward/broker"
	"github.com/pgward/pgward/exporter"
)

// checkpointKey fetches the audit checkpoint signing key that
// audit.checkpoint.key names: the password of (upstream, role) in its
// secrets backend (by default secrets.backend), opened here if no upstream
// uses it. It is read once, at start.
func checkpointKey(ctx context.Context, cfg *Config, r *router, log *slog.Logger) (exporter.CheckpointKey, error) {
	ref := cfg.Audit.Checkpoint.Key
	name := ref.Backend // defaults applied: secrets.backend when unset
	src := r.backends[name]
	if src == nil {
		s, err := openBackend(name, cfg, log)
		if err != nil {
			return exporter.CheckpointKey{}, &broker.FieldError{Path: "audit.checkpoint.key", Err: err}
		}
		r.backends[name] = s // closed with the router
		src = s
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	cred, err := src.Fetch(ctx, ref.Upstream, ref.Role)
	if err != nil {
		return exporter.CheckpointKey{}, &broker.FieldError{Path: "audit.checkpoint.key", Err: fmt.Errorf("%s.%s from the %s backend: %w", ref.Upstream, ref.Role, name, err)}
	}
	if cred.Lease != nil && cred.Lease.Release != nil {
		cred.Lease.Release() // a dynamic credential is no signing key; let it go
	}
	key, err := exporter.ParseCheckpointKey(cred.Password.Reveal())
	if err != nil {
		return exporter.CheckpointKey{}, &broker.FieldError{Path: "audit.checkpoint.key", Err: fmt.Errorf("%s.%s from the %s backend: %w", ref.Upstream, ref.Role, name, err)}
	}
	return key, nil
}
