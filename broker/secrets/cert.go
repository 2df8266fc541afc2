package secrets

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"time"
)

// ClientCert is a TLS client certificate and its private key, for upstream
// `cert` authentication (upstreams.<name>.auth: [cert]). It prints — String,
// GoString, Format, LogValue, MarshalJSON, MarshalText — as the leaf's
// subject, serial and expiry only, never the key.
type ClientCert struct {
	cert tls.Certificate
	// CommonName is the leaf certificate's subject CN: under PostgreSQL's
	// cert authentication, the role the certificate logs in as.
	CommonName string
	// Serial is the leaf's serial number in decimal, as PostgreSQL's
	// pg_stat_ssl.client_serial shows it; not secret.
	Serial string
	// NotBefore and NotAfter bound the leaf's validity.
	NotBefore, NotAfter time.Time
}

// ParseClientCert parses a PEM certificate (the leaf first, then any
// intermediates) and its PEM private key (PKCS#1, PKCS#8 or EC), and checks
// they belong together. Its errors never quote the key.
func ParseClientCert(certPEM, keyPEM []byte) (*ClientCert, error) {
	c, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		// crypto/tls's messages name the problem, never the PEM content.
		return nil, fmt.Errorf("client certificate and key: %w", err)
	}
	leaf := c.Leaf
	if leaf == nil {
		if leaf, err = x509.ParseCertificate(c.Certificate[0]); err != nil {
			return nil, fmt.Errorf("client certificate: %w", err)
		}
		c.Leaf = leaf
	}
	if leaf.Subject.CommonName == "" {
		return nil, errors.New("client certificate has no subject common name (PostgreSQL's cert authentication maps the CN to the role)")
	}
	return &ClientCert{cert: c, CommonName: leaf.Subject.CommonName, Serial: leaf.SerialNumber.String(),
		NotBefore: leaf.NotBefore, NotAfter: leaf.NotAfter}, nil
}

// TLSCertificate returns the certificate and key for a tls.Config. Call it
// only where the TLS handshake with the upstream is set up.
func (c *ClientCert) TLSCertificate() *tls.Certificate { return &c.cert }

// Expired reports whether the certificate is outside its validity at t.
func (c *ClientCert) Expired(t time.Time) bool { return t.After(c.NotAfter) || t.Before(c.NotBefore) }

func (c *ClientCert) String() string {
	if c == nil {
		return "<no client certificate>"
	}
	return fmt.Sprintf("client certificate CN=%q serial=%s not_after=%s", c.CommonName, c.Serial, c.NotAfter.UTC().Format(time.RFC3339))
}

// GoString prints like String: the key stays out of %#v.
func (c *ClientCert) GoString() string { return c.String() }

// Format makes every fmt verb print String.
func (c *ClientCert) Format(f fmt.State, _ rune) { _, _ = f.Write([]byte(c.String())) }

// LogValue logs the certificate's public facts.
func (c *ClientCert) LogValue() slog.Value {
	if c == nil {
		return slog.StringValue("none")
	}
	return slog.GroupValue(slog.String("cn", c.CommonName), slog.String("serial", c.Serial),
		slog.Time("not_after", c.NotAfter))
}

// MarshalJSON writes String, never the key.
func (c *ClientCert) MarshalJSON() ([]byte, error) { return []byte(fmt.Sprintf("%q", c.String())), nil }

// MarshalText writes String, never the key.
func (c *ClientCert) MarshalText() ([]byte, error) { return []byte(c.String()), nil }
