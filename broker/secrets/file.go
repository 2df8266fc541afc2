package secrets

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"syscall"
	"time"

	"gopkg.in/yaml.v3"
)

// FileConfig configures the file backend.
type FileConfig struct {
	// Path of the secrets file: upstream → role → {password, user}. It must
	// not be readable or writable by group or others.
	Path string `yaml:"path"`
}

// File reads credentials from a YAML file, re-reading it when it changes
// (checked at most once a second). A changed file that is invalid or too
// open is refused and the last good content stays in use.
type File struct {
	path string
	log  *slog.Logger

	mu      sync.Mutex
	creds   map[string]map[string]fileEntry
	stamp   fileStamp
	certs   map[string]fileStamp // cert_file and key_file paths the content was read from
	checked time.Time
	now     func() time.Time
}

type fileEntry struct {
	User     string `yaml:"user"`
	Password string `yaml:"password"`
	// Cert and Key are a client certificate (leaf first) and its private
	// key, PEM, inline; CertFile and KeyFile name files holding them.
	// Either pair, for upstream `cert` authentication (cert.go).
	Cert     string `yaml:"cert"`
	Key      string `yaml:"key"`
	CertFile string `yaml:"cert_file"`
	KeyFile  string `yaml:"key_file"`

	cert *ClientCert
}

type fileStamp struct {
	ino   uint64
	size  int64
	mtime time.Time
}

// NewFile loads the secrets file. The error names every problem.
func NewFile(cfg FileConfig, log *slog.Logger) (*File, error) {
	if cfg.Path == "" {
		return nil, errors.New("secrets.file.path is required")
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	f := &File{path: cfg.Path, log: log, now: time.Now}
	creds, stamp, certs, err := loadFile(cfg.Path)
	if err != nil {
		return nil, err
	}
	f.creds, f.stamp, f.certs, f.checked = creds, stamp, certs, f.now()
	f.warnExpiring()
	return f, nil
}

func loadFile(path string) (map[string]map[string]fileEntry, fileStamp, map[string]fileStamp, error) {
	creds, st, err := loadCreds(path)
	if err != nil {
		return nil, fileStamp{}, nil, err
	}
	certs, err := loadCerts(path, creds)
	if err != nil {
		return nil, fileStamp{}, nil, err
	}
	return creds, st, certs, nil
}

func loadCreds(path string) (map[string]map[string]fileEntry, fileStamp, error) {
	fh, err := os.Open(path)
	if err != nil {
		return nil, fileStamp{}, fmt.Errorf("open secrets file: %w", err)
	}
	defer fh.Close()
	fi, err := fh.Stat()
	if err != nil {
		return nil, fileStamp{}, fmt.Errorf("stat secrets file: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fileStamp{}, fmt.Errorf("secrets file %s is not a regular file", path)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return nil, fileStamp{}, fmt.Errorf("secrets file %s has mode %04o: it must not be accessible by group or others (chmod 600 %s)", path, fi.Mode().Perm(), path)
	}
	st := fileStamp{size: fi.Size(), mtime: fi.ModTime()}
	if sys, ok := fi.Sys().(*syscall.Stat_t); ok {
		st.ino = sys.Ino
	}
	data, err := readAll(fh, 16<<20)
	if err != nil {
		return nil, fileStamp{}, fmt.Errorf("read secrets file: %w", err)
	}
	var creds map[string]map[string]fileEntry
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&creds); err != nil && !errors.Is(err, io.EOF) {
		// yaml's messages carry line numbers and keys, never values of scalars we did not ask for.
		return nil, fileStamp{}, fmt.Errorf("secrets file %s: %s", path, sanitizeYAMLError(err))
	}
	return creds, st, nil
}

// Fetch returns the credential for role on upstream.
func (f *File) Fetch(_ context.Context, upstream, role string) (Credential, error) {
	f.maybeReload()
	f.mu.Lock()
	e, ok := f.creds[upstream][role]
	f.mu.Unlock()
	if !ok {
		return Credential{}, fmt.Errorf("file %s: %s.%s: %w", f.path, upstream, role, ErrNotFound)
	}
	return Credential{User: e.User, Password: NewSecret(e.Password), Cert: e.cert}, nil
}

// Reload re-reads the file (and the certificate files it names) now. On
// error the old content stays in use.
func (f *File) Reload() error {
	creds, st, certs, err := loadFile(f.path)
	if err != nil {
		return err
	}
	f.mu.Lock()
	f.creds, f.stamp, f.certs, f.checked = creds, st, certs, f.now()
	f.mu.Unlock()
	f.warnExpiring()
	return nil
}

func (f *File) maybeReload() {
	f.mu.Lock()
	if f.now().Sub(f.checked) < time.Second {
		f.mu.Unlock()
		return
	}
	f.checked = f.now()
	old := f.stamp
	f.mu.Unlock()
	fi, err := os.Stat(f.path)
	if err != nil {
		f.log.Warn("secrets file unreadable; keeping the last good content", "path", f.path, "err", err)
		return
	}
	st := fileStamp{size: fi.Size(), mtime: fi.ModTime()}
	if sys, ok := fi.Sys().(*syscall.Stat_t); ok {
		st.ino = sys.Ino
	}
	if st == old && !f.certsChanged() {
		return
	}
	if err := f.Reload(); err != nil {
		f.log.Warn("secrets file changed but is invalid; keeping the last good content", "path", f.path, "err", err)
		certs := f.currentCertStamps()
		f.mu.Lock()
		f.stamp, f.certs = st, certs // do not retry until it changes again
		f.mu.Unlock()
		return
	}
	f.log.Info("secrets file reloaded", "path", f.path)
}
