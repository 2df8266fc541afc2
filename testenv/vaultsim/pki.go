package vaultsim

import (
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"
)

// Issuer signs client certificates for a PKI role; *testenv.CA is one, so
// the certificates are real X.509 that a test PostgreSQL with
// testenv.Options.ClientCA trusts.
type Issuer interface {
	IssueClientValid(commonName string, notBefore, notAfter time.Time) (certPEM, keyPEM []byte, err error)
}

// PKIRole is a role of a PKI secrets engine mount: pki/issue/<role>.
type PKIRole struct {
	// Issuer signs the certificates; CAPEM is its certificate, returned as
	// issuing_ca and ca_chain.
	Issuer Issuer
	CAPEM  []byte
	// TTL is the certificates' lifetime when the request names none
	// (default 1h); MaxTTL caps a requested ttl (default 24h).
	TTL, MaxTTL time.Duration
	// AllowedCommonNames, when set, are the only common names issued
	// (Vault's allowed_domains with allow_bare_domains); others get 400.
	AllowedCommonNames []string
}

// IssuedCert records a certificate the simulator issued (never its key).
type IssuedCert struct {
	Mount, Role, CommonName string
	Serial                  string // decimal, as pg_stat_ssl.client_serial shows it
	NotAfter                time.Time
	Time                    time.Time
}

// AddPKIRole mounts a PKI engine at mount (if not yet) with role name.
func (s *Server) AddPKIRole(mount, name string, r PKIRole) {
	if r.TTL <= 0 {
		r.TTL = time.Hour
	}
	if r.MaxTTL <= 0 {
		r.MaxTTL = 24 * time.Hour
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.pkiRoles == nil {
		s.pkiRoles = map[string]PKIRole{}
	}
	s.pkiRoles[mount+"/"+name] = r
}

// Issued lists the certificates issued so far, oldest first.
func (s *Server) Issued() []IssuedCert {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]IssuedCert(nil), s.issued...)
}

func (s *Server) isPKIMount(mount string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for k := range s.pkiRoles {
		if strings.HasPrefix(k, mount+"/") {
			return true
		}
	}
	return false
}

// pkiIssue answers pki/issue/<role> as Vault does: a new key pair and a
// certificate for common_name, valid from 30 s ago (Vault's
// not_before_duration) for ttl.
func (s *Server) pkiIssue(w http.ResponseWriter, r *http.Request, mount, name string) {
	s.mu.Lock()
	role, ok := s.pkiRoles[mount+"/"+name]
	s.mu.Unlock()
	if !ok {
		writeErrors(w, http.StatusBadRequest, []string{fmt.Sprintf("unknown role: %s", name)})
		return
	}
	body, err := readBody(r)
	if err != nil {
		writeErrors(w, http.StatusBadRequest, []string{err.Error()})
		return
	}
	cn, _ := body["common_name"].(string)
	if cn == "" {
		writeErrors(w, http.StatusBadRequest, []string{"the common_name field is required, or must be provided in a CSR with \"use_csr_common_name\" set to true, unless \"require_cn\" is set to false"})
		return
	}
	if len(role.AllowedCommonNames) > 0 && !slices.Contains(role.AllowedCommonNames, cn) {
		writeErrors(w, http.StatusBadRequest, []string{fmt.Sprintf("common name %s not allowed by this role", cn)})
		return
	}
	ttl := role.TTL
	if v, ok := body["ttl"]; ok {
		d, err := parseDuration(v)
		if err != nil {
			writeErrors(w, http.StatusBadRequest, []string{err.Error()})
			return
		}
		if d > 0 {
			ttl = min(d, role.MaxTTL)
		}
	}
	now := time.Now()
	certPEM, keyPEM, err := role.Issuer.IssueClientValid(cn, now.Add(-30*time.Second), now.Add(ttl))
	if err != nil {
		writeErrors(w, http.StatusInternalServerError, []string{"failed to issue certificate: " + err.Error()})
		return
	}
	b, _ := pem.Decode(certPEM)
	if b == nil {
		writeErrors(w, http.StatusInternalServerError, []string{"issuer returned no PEM"})
		return
	}
	leaf, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		writeErrors(w, http.StatusInternalServerError, []string{err.Error()})
		return
	}
	hex := fmt.Sprintf("%x", leaf.SerialNumber)
	if len(hex)%2 == 1 {
		hex = "0" + hex
	}
	var colon []string
	for i := 0; i < len(hex); i += 2 {
		colon = append(colon, hex[i:i+2])
	}
	s.mu.Lock()
	s.issued = append(s.issued, IssuedCert{Mount: mount, Role: name, CommonName: cn, Serial: leaf.SerialNumber.String(),
		NotAfter: leaf.NotAfter, Time: now})
	s.mu.Unlock()
	s.logf("issued certificate CN=%s serial=%s for %s", cn, leaf.SerialNumber, ttl)
	ca := strings.TrimSpace(string(role.CAPEM))
	writeJSON(w, http.StatusOK, response{RequestID: randomUUID(), Data: map[string]any{
		"certificate":      strings.TrimSpace(string(certPEM)),
		"issuing_ca":       ca,
		"ca_chain":         []string{ca},
		"private_key":      strings.TrimSpace(string(keyPEM)),
		"private_key_type": "ec",
		"serial_number":    strings.Join(colon, ":"),
		"expiration":       leaf.NotAfter.Unix(),
	}})
}
