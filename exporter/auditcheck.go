package exporter

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
)

// CheckAudit reports what would keep OpenFileSink from opening cfg.Path,
// without creating or changing anything: the directory must exist and be
// writable, and an existing file must be a regular, writable file whose last
// complete line is a pgward audit event (the chain goes on from it).
// OpenFileSink runs it first, and `pgward check-config` runs it too.
func CheckAudit(cfg AuditConfig) error {
	path := cfg.Path
	if path == "" {
		return nil // Validate says it is required
	}
	dir := filepath.Dir(path)
	fi, err := os.Stat(dir)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("directory %s does not exist: create it (the systemd unit's LogsDirectory=pgward makes /var/log/pgward)", dir)
	case err != nil:
		return fmt.Errorf("directory %s: %w", dir, err)
	case !fi.IsDir():
		return fmt.Errorf("%s is not a directory", dir)
	}
	fi, err = os.Stat(path)
	if errors.Is(err, os.ErrNotExist) {
		if err := syscall.Access(dir, 2 /* W_OK */); err != nil {
			return fmt.Errorf("cannot create the audit file in %s: %w", dir, err)
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("audit file %s: %w", path, err)
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("audit file %s is not a regular file", path)
	}
	if err := syscall.Access(path, 2 /* W_OK */); err != nil {
		return fmt.Errorf("audit file %s is not writable: %w", path, err)
	}
	last, _, _, err := readLastLine(path)
	if err != nil {
		return fmt.Errorf("read audit file: %w", err)
	}
	if last != nil {
		if _, _, err := chainFields(last); err != nil {
			return fmt.Errorf("audit file %s: last line is not a pgward audit event (%w); move the file aside", path, err)
		}
	}
	return nil
}
