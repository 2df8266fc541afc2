package agent

import (
	"fmt"
	"log/slog"

	"github.com/pgward/pgward/broker/secrets"
	"github.com/pgward/pgward/broker/secrets/vault"
)

// vaultSource adapts *vault.Source, whose Close returns nothing, to the
// agent's closers.
type vaultSource struct{ *vault.Source }

func (v vaultSource) Close() error {
	v.Source.Close()
	return nil
}

func newVaultSource(cfg *Config, log *slog.Logger, opts ...vault.Option) (secrets.Source, error) {
	src, err := vault.New(*cfg.Secrets.Vault, log, opts...)
	if err != nil {
		return nil, fmt.Errorf("secrets backend vault: %w", err)
	}
	return vaultSource{src}, nil
}
