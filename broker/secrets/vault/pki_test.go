package vault_test

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/pgward/pgward/broker/secrets"
	"github.com/pgward/pgward/broker/secrets/vault"
	"github.com/pgward/pgward/testenv/vaultsim"
)

// A pki role: the certificate is issued with the role as its CN, shared by
// later fetches, renewed when a third of its life remains, and, when Vault
// cannot renew it, refused once it expired (ErrCertExpired). Its key is
// never logged.
func TestPKIClientCertificate(t *testing.T) {
	h := newHarness(t)
	h.needSim("the PKI engine signs with the test CA")
	h.sim.AddPKIRole("pki", "client", vaultsim.PKIRole{Issuer: h.pg.CA, CAPEM: h.pg.CA.CertPEM})
	const ttl = 3 * time.Second
	src := h.source(h.config(map[string]map[string]vault.RoleConfig{
		"orders": {"orders_rw": {PKI: &vault.PKIConfig{Role: "client", TTL: ttl}}},
	}))
	ctx := context.Background()
	fetch := func() (secrets.Credential, error) { return src.Fetch(ctx, "orders", "orders_rw") }
	c1, err := fetch()
	if err != nil {
		t.Fatal(err)
	}
	if c1.Cert == nil || c1.Cert.CommonName != "orders_rw" || c1.User != "orders_rw" {
		t.Fatalf("credential %v", c1)
	}
	der, err := x509.MarshalPKCS8PrivateKey(c1.Cert.TLSCertificate().PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	keyPEM := string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}))
	h.remember(strings.Split(keyPEM, "\n")[1]) // checkLogs: never in the log
	c2, err := fetch()
	if err != nil || c2.Cert.Serial != c1.Cert.Serial || len(h.sim.Issued()) != 1 {
		t.Fatalf("second fetch: %v %v, issued %d", c2.Cert, err, len(h.sim.Issued()))
	}

	// Renewed at two thirds of its life, before it expires.
	deadline := time.Now().Add(2 * ttl)
	for !strings.Contains(h.logs.String(), "vault pki certificate renewed") { // the sim records it before pgward has it
		if time.Now().After(deadline) {
			t.Fatal("not renewed")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if got := h.sim.Issued()[1].Time; !got.Before(c1.Cert.NotAfter) || got.Before(c1.Cert.NotAfter.Add(-ttl/2)) {
		t.Fatalf("renewed at %v; first certificate expires %v", got, c1.Cert.NotAfter)
	}
	c3, err := fetch()
	if err != nil || c3.Cert.Serial == c1.Cert.Serial {
		t.Fatalf("after renewal: %v %v", c3.Cert, err)
	}

	// Vault fails: the current certificate serves until it expires, then
	// fetches fail saying so.
	h.sim.Inject(vaultsim.Fault{Path: "pki/", Status: 500})
	if c, err := fetch(); err != nil || c.Cert.Serial != c3.Cert.Serial {
		t.Fatalf("while the certificate is valid: %v %v", c.Cert, err)
	}
	time.Sleep(time.Until(c3.Cert.NotAfter) + 200*time.Millisecond)
	_, err = fetch()
	if !errors.Is(err, secrets.ErrCertExpired) || !errors.Is(err, secrets.ErrUnavailable) || !strings.Contains(err.Error(), "expired") {
		t.Fatalf("after expiry without renewal: %v", err)
	}
	for end := time.Now().Add(3 * time.Second); !strings.Contains(h.logs.String(), "could not be renewed"); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatal("no ERROR line when the certificate expired unrenewed")
		}
	}
}
