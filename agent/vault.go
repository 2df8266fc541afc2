package agent

import (
	"errors"
	"log/slog"

	"github.com/pgward/pgward/broker/secrets"
)

func newVaultSource(cfg *Config, log *slog.Logger) (secrets.Source, error) {
	return nil, errors.New("secrets backend vault: not wired yet")
}
