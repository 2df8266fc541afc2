package secrets

import (
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"time"
)

// loadCerts checks that every entry of the secrets file holds a password or
// a client certificate (or both), and parses the certificates: inline (cert
// and key, PEM) or from files (cert_file and key_file). The key file, like
// the secrets file, must not be accessible by group or others; a relative
// path is taken from the secrets file's directory. It returns the stamps of
// the files read, for maybeReload to notice a rotated certificate.
func loadCerts(path string, creds map[string]map[string]fileEntry) (map[string]fileStamp, error) {
	stamps := map[string]fileStamp{}
	var problems []error
	bad := func(up, role, format string, args ...any) {
		problems = append(problems, fmt.Errorf("secrets file %s: %s.%s: %s", path, up, role, fmt.Sprintf(format, args...)))
	}
	for _, up := range slices.Sorted(maps.Keys(creds)) {
		roles := creds[up]
		for _, role := range slices.Sorted(maps.Keys(roles)) {
			e := roles[role]
			inline := e.Cert != "" || e.Key != ""
			files := e.CertFile != "" || e.KeyFile != ""
			switch {
			case inline && files:
				bad(up, role, "give cert and key, or cert_file and key_file, not both")
				continue
			case inline && (e.Cert == "" || e.Key == ""):
				bad(up, role, "cert and key go together")
				continue
			case files && (e.CertFile == "" || e.KeyFile == ""):
				bad(up, role, "cert_file and key_file go together")
				continue
			case !inline && !files:
				if e.Password == "" {
					bad(up, role, "password is empty (and no client certificate is given)")
				}
				continue
			}
			certPEM, keyPEM := []byte(e.Cert), []byte(e.Key)
			if files {
				var err error
				if certPEM, err = readCertFile(path, e.CertFile, false, stamps); err != nil {
					bad(up, role, "cert_file: %s", err)
					continue
				}
				if keyPEM, err = readCertFile(path, e.KeyFile, true, stamps); err != nil {
					bad(up, role, "key_file: %s", err)
					continue
				}
			}
			c, err := ParseClientCert(certPEM, keyPEM)
			if err != nil {
				bad(up, role, "%s", err)
				continue
			}
			e.cert = c
			roles[role] = e
		}
	}
	if err := errors.Join(problems...); err != nil {
		return nil, err
	}
	return stamps, nil
}

func readCertFile(secretsPath, name string, private bool, stamps map[string]fileStamp) ([]byte, error) {
	if !filepath.IsAbs(name) {
		name = filepath.Join(filepath.Dir(secretsPath), name)
	}
	fh, err := os.Open(name)
	if err != nil {
		return nil, err
	}
	defer fh.Close()
	fi, err := fh.Stat()
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is not a regular file", name)
	}
	if private && fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("%s has mode %04o: a private key must not be accessible by group or others (chmod 600 %s)", name, fi.Mode().Perm(), name)
	}
	data, err := readAll(fh, 1<<20)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", name, err)
	}
	stamps[name] = stampOf(fi)
	return data, nil
}

func stampOf(fi os.FileInfo) fileStamp {
	st := fileStamp{size: fi.Size(), mtime: fi.ModTime()}
	if sys, ok := fi.Sys().(*syscall.Stat_t); ok {
		st.ino = sys.Ino
	}
	return st
}

// certsChanged reports whether a certificate or key file read at the last
// load changed since (a rotation by cert-manager, certbot or a deploy).
func (f *File) certsChanged() bool {
	f.mu.Lock()
	certs := f.certs
	f.mu.Unlock()
	for name, old := range certs {
		if statStamp(name) != old {
			return true
		}
	}
	return false
}

// currentCertStamps stamps the certificate files as they are now.
func (f *File) currentCertStamps() map[string]fileStamp {
	f.mu.Lock()
	names := make([]string, 0, len(f.certs))
	for name := range f.certs {
		names = append(names, name)
	}
	f.mu.Unlock()
	stamps := make(map[string]fileStamp, len(names))
	for _, name := range names {
		stamps[name] = statStamp(name)
	}
	return stamps
}

// statStamp is name's stamp, zero when it cannot be read.
func statStamp(name string) fileStamp {
	fi, err := os.Stat(name)
	if err != nil {
		return fileStamp{}
	}
	return stampOf(fi)
}

// certWarnMargin: a certificate this close to its expiry is logged at
// WARN when loaded.
const certWarnMargin = 7 * 24 * time.Hour

// warnExpiring logs certificates that expired or expire soon. They are
// still presented: the server's refusal (28000) is what the client sees.
func (f *File) warnExpiring() {
	f.mu.Lock()
	defer f.mu.Unlock()
	now := f.now()
	for _, up := range slices.Sorted(maps.Keys(f.creds)) {
		for _, role := range slices.Sorted(maps.Keys(f.creds[up])) {
			c := f.creds[up][role].cert
			switch {
			case c == nil:
			case c.Expired(now):
				f.log.Warn("secrets file: client certificate is not valid now; the upstream will refuse it", "upstream", up, "role", role, "cert", c)
			case c.NotAfter.Sub(now) < certWarnMargin:
				f.log.Warn("secrets file: client certificate expires soon", "upstream", up, "role", role, "cert", c)
			}
		}
	}
}
