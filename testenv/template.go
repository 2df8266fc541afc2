package testenv

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// templateVersion changes whenever what the template holds changes in a way
// the key below cannot see.
const templateVersion = "2"

// ownerFile, in an instance or build directory, holds the pid of the process
// that made it, so sweepStale can remove what dead processes left behind.
const ownerFile = "owner.pid"

// templateMu keeps the goroutines of one process from building the same
// template twice; templateLock (flock) does the same across processes.
var templateMu sync.Mutex

// templateDir returns a data directory holding a cleanly shut down cluster
// with the fixed roles and Database, building it on first use. The cache is
// /tmp/pgward-testenv-<euid>/<key>, key = hash of the server version, bin dir,
// server account and bootstrap SQL. It returns "" (no error) when the cache
// directory cannot be trusted, and the caller runs initdb itself.
func templateDir(ctx context.Context, bin string, su osUser, opts Options) (string, error) {
	parent := filepath.Join(tempRoot(), fmt.Sprintf("pgward-testenv-%d", os.Geteuid()))
	if err := os.Mkdir(parent, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
		return "", nil
	}
	if !trustedDir(parent) {
		opts.logf("testenv: %s is not a directory owned by us and closed to others; not caching", parent)
		return "", nil
	}
	key, err := templateKey(bin, su)
	if err != nil {
		return "", err
	}
	dir := filepath.Join(parent, key)
	if isCluster(dir) {
		return dir, nil
	}

	templateMu.Lock()
	defer templateMu.Unlock()
	unlock, err := flock(filepath.Join(parent, key+".lock"))
	if err != nil {
		return "", err
	}
	defer unlock()
	if isCluster(dir) { // built while we waited
		return dir, nil
	}
	sweepStale(parent, "build-")
	t := time.Now()
	if err := buildTemplate(ctx, bin, su, opts, parent, dir); err != nil {
		return "", fmt.Errorf("build template cluster: %w", err)
	}
	opts.logf("testenv: built template cluster %s in %v", dir, time.Since(t).Round(time.Millisecond))
	return dir, nil
}

func buildTemplate(ctx context.Context, bin string, su osUser, opts Options, parent, dir string) error {
	root, err := os.MkdirTemp(parent, "build-")
	if err != nil {
		return fmt.Errorf("create build dir: %w", err)
	}
	// The build instance is an ordinary instance that is stopped cleanly
	// and whose data directory is then renamed into place.
	bopts := Options{Logf: opts.Logf}
	p := newPostgres(bin, root, su, bopts)
	defer p.Stop() // removes root, and with it a failed build
	if err := p.prepareDirs(); err != nil {
		return err
	}
	if err := p.initdb(ctx); err != nil {
		return err
	}
	if err := p.configure(); err != nil {
		return err
	}
	if err := p.startFreshPort(ctx); err != nil {
		return err
	}
	if err := p.bootstrap(ctx); err != nil {
		return err
	}
	p.mu.Lock()
	pm := p.pm
	_ = p.haltLocked(syscall.SIGINT, 30*time.Second) // fast: shutdown checkpoint, no recovery on copy
	p.mu.Unlock()
	if pm.err != nil {
		return fmt.Errorf("clean shutdown: %w", pm.err)
	}
	for _, f := range []string{"postmaster.opts", "postmaster.pid", "postgres.log", "server.key", "server.crt"} {
		_ = os.Remove(filepath.Join(p.DataDir, f))
	}
	if err := os.Rename(p.DataDir, dir); err != nil {
		return fmt.Errorf("install template: %w", err)
	}
	return nil
}

func templateKey(bin string, su osUser) (string, error) {
	out, err := exec.Command(filepath.Join(bin, "postgres"), "--version").Output()
	if err != nil {
		return "", fmt.Errorf("postgres --version: %w", err)
	}
	h := sha256.New()
	for _, s := range []string{templateVersion, bin, string(out), strconv.Itoa(int(su.uid)),
		strconv.Itoa(int(su.gid)), SuperUser, SuperPassword, bootstrapRoles, Database, bootstrapDB} {
		h.Write([]byte(s))
		h.Write([]byte{0})
	}
	major := strings.Fields(string(out))
	v := "pg"
	if len(major) > 0 {
		v += strings.Split(major[len(major)-1], ".")[0]
	}
	return v + "-" + hex.EncodeToString(h.Sum(nil))[:16], nil
}

func isCluster(dir string) bool {
	_, err := os.Stat(filepath.Join(dir, "PG_VERSION"))
	return err == nil
}

// trustedDir: a real directory owned by us that nobody else can write.
func trustedDir(dir string) bool {
	fi, err := os.Lstat(dir)
	if err != nil || !fi.IsDir() || fi.Mode().Perm()&0o022 != 0 {
		return false
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	return ok && int(st.Uid) == os.Geteuid()
}

func flock(path string) (unlock func(), err error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open lock: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	return func() { f.Close() }, nil
}

// copyTree copies the cluster in src into the existing directory dst,
// keeping modes and giving everything to the server account.
func copyTree(src, dst string, su osUser) error {
	return filepath.WalkDir(src, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, path)
		if err != nil {
			return err
		}
		target := filepath.Join(dst, rel)
		info, err := d.Info()
		if err != nil {
			return err
		}
		switch {
		case d.IsDir():
			if rel != "." {
				if err := os.Mkdir(target, info.Mode().Perm()); err != nil {
					return err
				}
			}
			if err := os.Chmod(target, info.Mode().Perm()); err != nil {
				return err
			}
		case d.Type()&fs.ModeSymlink != 0:
			link, err := os.Readlink(path)
			if err != nil {
				return err
			}
			if err := os.Symlink(link, target); err != nil {
				return err
			}
		case d.Type().IsRegular():
			if err := copyFile(path, target, info.Mode().Perm()); err != nil {
				return err
			}
		default:
			return nil // sockets, fifos: not part of a stopped cluster
		}
		return su.chown(target)
	})
}

func copyFile(src, dst string, mode os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil { // copy_file_range on Linux
		out.Close()
		return err
	}
	return out.Close()
}

// sweepStale removes directories named prefix* under dir, owned by us, whose
// owner process is gone (a test binary that was killed before Stop).
func sweepStale(dir, prefix string) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range ents {
		if !e.IsDir() || !strings.HasPrefix(e.Name(), prefix) {
			continue
		}
		path := filepath.Join(dir, e.Name())
		if !trustedDirLoose(path) {
			continue
		}
		b, err := os.ReadFile(filepath.Join(path, ownerFile))
		if err != nil {
			continue // not ours, or still being set up
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil || pid <= 0 || processAlive(pid) {
			continue
		}
		// The postmaster died with its owner (Pdeathsig); release its
		// shared memory and the files.
		(&Postgres{DataDir: filepath.Join(path, "data")}).releaseStaleShmem()
		_ = os.RemoveAll(path)
	}
}

// trustedDirLoose: a real directory owned by us.
func trustedDirLoose(dir string) bool {
	fi, err := os.Lstat(dir)
	if err != nil || !fi.IsDir() {
		return false
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	return ok && int(st.Uid) == os.Geteuid()
}
