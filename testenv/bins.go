package testenv

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
)

// InstallCommand installs the PostgreSQL server binaries on Debian and Ubuntu.
const InstallCommand = "apt-get install -y postgresql"

// BinDirEnv names an environment variable that, when set, is the directory
// holding postgres and initdb; FindBinDir then looks nowhere else.
const BinDirEnv = "PGWARD_PG_BINDIR"

// ErrNoPostgres is returned (wrapped) by FindBinDir when no PostgreSQL server
// binaries are installed.
var ErrNoPostgres = errors.New("postgresql server binaries (postgres, initdb) not found")

// FindBinDir returns the directory holding the postgres and initdb binaries:
// $PGWARD_PG_BINDIR if set; else the directory of postgres on PATH; else
// `pg_config --bindir`; else the highest version under
// /usr/lib/postgresql/*/bin (Debian) or /usr/pgsql-*/bin (RPM).
func FindBinDir() (string, error) {
	if d := os.Getenv(BinDirEnv); d != "" {
		if !hasServerBins(d) {
			return "", fmt.Errorf("%s=%s: %w there", BinDirEnv, d, ErrNoPostgres)
		}
		return d, nil
	}
	if p, err := exec.LookPath("postgres"); err == nil {
		if d := filepath.Dir(p); hasServerBins(d) {
			return d, nil
		}
	}
	if out, err := exec.Command("pg_config", "--bindir").Output(); err == nil {
		if d := strings.TrimSpace(string(out)); hasServerBins(d) {
			return d, nil
		}
	}
	var cands []string
	for _, pat := range []string{"/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin"} {
		m, _ := filepath.Glob(pat)
		cands = append(cands, m...)
	}
	sort.SliceStable(cands, func(i, j int) bool { return dirVersion(cands[i]) > dirVersion(cands[j]) })
	for _, d := range cands {
		if hasServerBins(d) {
			return d, nil
		}
	}
	return "", fmt.Errorf("%w (install with `%s`, or set %s)", ErrNoPostgres, InstallCommand, BinDirEnv)
}

func hasServerBins(dir string) bool {
	for _, b := range []string{"postgres", "initdb"} {
		fi, err := os.Stat(filepath.Join(dir, b))
		if err != nil || fi.IsDir() || fi.Mode()&0o111 == 0 {
			return false
		}
	}
	return true
}

// dirVersion extracts the major version from .../postgresql/15/bin or
// /usr/pgsql-15/bin; 0 when there is none.
func dirVersion(binDir string) float64 {
	base := filepath.Base(filepath.Dir(binDir))
	base = strings.TrimPrefix(base, "pgsql-")
	v, err := strconv.ParseFloat(base, 64)
	if err != nil {
		return 0
	}
	return v
}
