package agent

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgward/pgward/broker"
	"github.com/pgward/pgward/broker/secrets/vault"
	"github.com/pgward/pgward/testenv"
	"github.com/pgward/pgward/testenv/faultpg"
	"github.com/pgward/pgward/testenv/vaultsim"
)

// Roles of certPG.
const (
	certUser  = "cert_user"  // hostssl … cert clientcert=verify-full
	trustUser = "trust_user" // trust, on the socket file and over TCP
)

// certPG starts a Postgres that trusts its CA's client certificates
// (ssl_ca_file) and authenticates certUser by certificate only and
// trustUser not at all. The test's cleanup stops it.
func certPG(t *testing.T) *testenv.Postgres {
	t.Helper()
	testenv.SharedPostgres(t) // the harness's shared server; also skips without Postgres
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	pg, err := testenv.StartPostgres(ctx, testenv.Options{
		Logf:     t.Logf,
		ClientCA: true,
		ExtraHBA: []string{
			"hostssl all " + certUser + " 127.0.0.1/32 cert clientcert=verify-full",
			"hostssl all " + testenv.ScramUser + " 127.0.0.1/32 scram-sha-256 clientcert=verify-full",
			"host all " + certUser + " 127.0.0.1/32 reject",
			"local all " + certUser + " reject",
			"local all " + trustUser + " trust",
			"host all " + trustUser + " 127.0.0.1/32 trust",
		},
	})
	if err != nil {
		t.Fatalf("start the cert Postgres: %v", err)
	}
	t.Cleanup(func() { _ = pg.Stop() })
	if err := pg.Exec(ctx, "CREATE ROLE "+certUser+" LOGIN; CREATE ROLE "+trustUser+" LOGIN"); err != nil {
		t.Fatal(err)
	}
	return pg
}

// certUpstream is a verify-full TLS upstream on pg with auth [cert].
func certUpstream(pg *testenv.Postgres) broker.UpstreamConfig {
	return broker.UpstreamConfig{Address: pg.TCPAddr(), Database: testenv.Database, Auth: []string{"cert"},
		TLS: broker.TLSConfig{Mode: "verify-full", CAFile: pg.CAFile, ServerName: "localhost"}}
}

func indentPEM(b []byte) string {
	return "      " + strings.ReplaceAll(strings.TrimSpace(string(b)), "\n", "\n      ")
}

// writeCertSecrets writes a secrets file for the cert tests and points the
// file backend at it.
func writeCertSecrets(t *testing.T, h *harness, c *Config, body string) {
	t.Helper()
	path := filepath.Join(h.dir, "cert-secrets.yaml")
	if err := os.WriteFile(path, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	c.Secrets.File.Path = path
}

func parseCert(t *testing.T, certPEM []byte) *x509.Certificate {
	t.Helper()
	b, _ := pem.Decode(certPEM)
	if b == nil {
		t.Fatal("no PEM")
	}
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// auth: [cert] with the file backend: a session through pgward logs in
// by the client certificate the secrets file holds (inline, and by
// cert_file/key_file), with pgx and with psql; the server sees that
// certificate. A certificate with the wrong common name and an expired one
// are refused by the server, and the client gets 28000, audited.
func TestCertAuthFileBackend(t *testing.T) {
	pg := certPG(t)
	good, goodKey, err := pg.CA.IssueClient(certUser)
	if err != nil {
		t.Fatal(err)
	}
	wrongCN, wrongKey, _ := pg.CA.IssueClient("somebody_else")
	expired, expiredKey, _ := pg.CA.IssueClientValid(certUser, time.Now().Add(-2*time.Hour), time.Now().Add(-time.Hour))
	goodCert := parseCert(t, good)
	scramCert, scramKey, _ := pg.CA.IssueClient(testenv.ScramUser)
	h := newHarness(t, func(h *harness, c *Config) {
		for name, data := range map[string][]byte{"exp.crt": expired, "exp.key": expiredKey} {
			if err := os.WriteFile(filepath.Join(h.dir, name), data, 0o600); err != nil {
				t.Fatal(err)
			}
		}
		writeCertSecrets(t, h, c, "certdb:\n  "+certUser+":\n    cert: |\n"+indentPEM(good)+"\n    key: |\n"+indentPEM(goodKey)+
			"\ncertwrong:\n  "+certUser+":\n    cert: |\n"+indentPEM(wrongCN)+"\n    key: |\n"+indentPEM(wrongKey)+
			"\ncertexp:\n  "+certUser+": { cert_file: exp.crt, key_file: exp.key }\n"+
			"certscram:\n  "+testenv.ScramUser+":\n    password: "+testenv.ScramPassword+"\n    cert: |\n"+indentPEM(scramCert)+"\n    key: |\n"+indentPEM(scramKey)+"\n")
		both := certUpstream(pg)
		both.Auth = []string{"cert", "scram-sha-256"}
		c.Upstreams["certscram"] = both
		c.Grants = append(c.Grants, broker.Grant{Principal: "me", Upstream: "certscram", Roles: []string{testenv.ScramUser}})
		for _, n := range []string{"certdb", "certwrong", "certexp"} {
			c.Upstreams[n] = certUpstream(pg)
			c.Grants = append(c.Grants, broker.Grant{Principal: "me", Upstream: n, Roles: []string{certUser}})
		}
	})
	ctx := context.Background()

	// pgx.
	conn := h.connect(t, certUser, "certdb")
	var who, dn, serial string
	if err := conn.QueryRow(ctx, "select current_user, s.client_dn, s.client_serial::text from pg_stat_ssl s where s.pid = pg_backend_pid()").Scan(&who, &dn, &serial); err != nil {
		t.Fatal(err)
	}
	if who != certUser || dn != "/CN="+certUser || serial != goodCert.SerialNumber.String() {
		t.Fatalf("pgx: user %q dn %q serial %s; want %s, /CN=%s, %s", who, dn, serial, certUser, certUser, goodCert.SerialNumber)
	}

	// psql (libpq).
	out, err := testenv.RunAs(uint32(os.Getuid()), uint32(os.Getgid()), "psql", "-XAt", "-c",
		"select current_user || ' ' || s.client_dn from pg_stat_ssl s where s.pid = pg_backend_pid()", h.dsn(certUser, "certdb")).CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != certUser+" /CN="+certUser {
		t.Fatalf("psql: %v %q", err, out)
	}

	// cert with SCRAM (pg_hba scram-sha-256 clientcert=verify-full): the
	// certificate in the handshake, then SCRAM with channel binding.
	both := h.connect(t, testenv.ScramUser, "certscram")
	if err := both.QueryRow(ctx, "select current_user, s.client_dn from pg_stat_ssl s where s.pid = pg_backend_pid()").Scan(&who, &dn); err != nil ||
		who != testenv.ScramUser || dn != "/CN="+testenv.ScramUser {
		t.Fatalf("cert and scram: %q %q %v", who, dn, err)
	}

	// The server's refusals: wrong CN (an ErrorResponse before
	// AuthenticationOk), expired (a TLS alert).
	for _, tc := range []struct{ upstream, detail string }{
		{"certwrong", "certificate authentication failed"},
		{"certexp", "expired"},
	} {
		e := connectErr(t, h.dsn(certUser, tc.upstream))
		if e.Code != broker.CodeInvalidAuthorization || !strings.Contains(e.Message, "refused the client certificate") || !strings.Contains(e.Detail, tc.detail) {
			t.Errorf("%s: got %s %q (detail %q); want 28000 with %q", tc.upstream, e.Code, e.Message, e.Detail, tc.detail)
		}
		out, err := testenv.RunAs(uint32(os.Getuid()), uint32(os.Getgid()), "psql", "-XAt", "-c", "select 1", h.dsn(certUser, tc.upstream)).CombinedOutput()
		if err == nil || !strings.Contains(string(out), "refused the client certificate") {
			t.Errorf("%s: psql: %v %q", tc.upstream, err, out)
		}
		findEvent(t, h, "db.session.start", func(ev map[string]any) bool {
			return ev["db_service"] == tc.upstream && ev["success"] == false && strings.Contains(asString(ev["error"]), "client certificate")
		})
	}
	for _, s := range []string{string(goodKey), string(wrongKey), string(expiredKey)} {
		line := strings.Split(s, "\n")[1]
		if strings.Contains(h.logs.String(), line) || strings.Contains(readFile(t, h.auditPath), line) {
			t.Fatal("a private key was written to the log or the audit")
		}
	}
}

// auth: [cert] accepts AuthenticationOk with no request only when the
// server asked for pgward's certificate: a server that trusts everybody
// (trust in pg_hba) is refused on a cert upstream, as it is by default.
// With auth: [trust] it is accepted, and pgward says so at WARN when it
// starts and at every reload.
func TestTrustUpstream(t *testing.T) {
	pg := certPG(t)
	good, goodKey, _ := pg.CA.IssueClient(trustUser)
	// A verify-full TLS server that asks for no client certificate and
	// lets everybody in: what a cert upstream must not accept.
	srvCert, srvKey, _ := pg.CA.Issue("localhost", "127.0.0.1")
	srvPair, err := tls.X509KeyPair(srvCert, srvKey)
	if err != nil {
		t.Fatal(err)
	}
	fake := faultpg.Start(t, func(s *faultpg.Server, c net.Conn) error {
		if code, _, err := faultpg.ReadPacket(c); err != nil || code != faultpg.SSLRequest {
			return err
		}
		if _, err := c.Write([]byte{'S'}); err != nil {
			return err
		}
		tc := tls.Server(c, &tls.Config{Certificates: []tls.Certificate{srvPair}})
		if err := tc.Handshake(); err != nil {
			return nil
		}
		if _, _, err := faultpg.ReadPacket(tc); err != nil {
			return nil
		}
		_, _ = tc.Write(faultpg.AuthOKReady())
		_, _, _ = faultpg.ReadPacket(tc) // until the client goes
		return nil
	})
	var conf *Config
	h := newHarness(t, func(h *harness, c *Config) {
		conf = c
		writeCertSecrets(t, h, c, "certtrust:\n  "+trustUser+":\n    cert: |\n"+indentPEM(good)+"\n    key: |\n"+indentPEM(goodKey)+
			"\nnotrust:\n  "+trustUser+": { password: unused-password }\n")
		c.Upstreams["trusted"] = broker.UpstreamConfig{Address: pg.SocketPath(), Database: testenv.Database, Auth: []string{"trust"}}
		c.Upstreams["trusted_tcp"] = broker.UpstreamConfig{Address: pg.TCPAddr(), Database: testenv.Database, Auth: []string{"trust"}, TLS: broker.TLSConfig{Mode: "disable"}}
		c.Upstreams["notrust"] = broker.UpstreamConfig{Address: pg.SocketPath(), Database: testenv.Database}
		c.Upstreams["certtrust"] = broker.UpstreamConfig{Address: fake.Addr(), Database: testenv.Database, Auth: []string{"cert"},
			TLS: broker.TLSConfig{Mode: "verify-full", CAFile: pg.CAFile, ServerName: "localhost"}}
		for _, n := range []string{"trusted", "trusted_tcp", "notrust", "certtrust"} {
			c.Grants = append(c.Grants, broker.Grant{Principal: "me", Upstream: n, Roles: []string{trustUser}})
		}
	})
	ctx := context.Background()
	warns := func() int {
		n := 0
		for _, l := range strings.Split(h.logs.String(), "\n") {
			if strings.Contains(l, `"level":"WARN"`) && strings.Contains(l, "auth lists trust") {
				n++
			}
		}
		return n
	}
	if n := warns(); n != 2 {
		t.Fatalf("WARN lines about trust at start: %d, want 2 (trusted, trusted_tcp)", n)
	}
	if !strings.Contains(h.logs.String(), `"upstream":"trusted_tcp"`) {
		t.Fatal("the WARN does not name the upstream")
	}

	for _, up := range []string{"trusted", "trusted_tcp"} {
		conn := h.connect(t, trustUser, up)
		var who string
		if err := conn.QueryRow(ctx, "select current_user").Scan(&who); err != nil || who != trustUser {
			t.Fatalf("%s: pgx: %q %v", up, who, err)
		}
		out, err := testenv.RunAs(uint32(os.Getuid()), uint32(os.Getgid()), "psql", "-XAt", "-c", "select current_user", h.dsn(trustUser, up)).CombinedOutput()
		if err != nil || strings.TrimSpace(string(out)) != trustUser {
			t.Fatalf("%s: psql: %v %q", up, err, out)
		}
	}

	// Not listed: refused, as before this option existed; and a cert
	// upstream whose server asked for no certificate is refused too.
	for _, up := range []string{"notrust", "certtrust"} {
		e := connectErr(t, h.dsn(trustUser, up))
		if e.Code != broker.CodeCannotConnect || !strings.Contains(e.Message, "authentication method pgward does not allow") {
			t.Errorf("%s: got %s %q; want 08001 refusing the method", up, e.Code, e.Message)
		}
		findEvent(t, h, "db.session.start", func(ev map[string]any) bool {
			return ev["db_service"] == up && ev["success"] == false
		})
	}
	if !strings.Contains(h.logs.String(), "did not ask for pgward's client certificate") {
		t.Error("the cert upstream's refusal does not say the server asked for no certificate")
	}
	if fake.Accepted() == 0 {
		t.Fatal("the fake upstream was never dialled: the test proves nothing")
	}

	// A reload warns again.
	if err := h.agent.Broker().Reload(conf.Config); err != nil {
		t.Fatal(err)
	}
	if n := warns(); n != 4 {
		t.Fatalf("WARN lines about trust after a reload: %d, want 4", n)
	}
}

// auth: [cert] with Vault's PKI engine: pgward asks pki/issue/<role> for a
// short-lived certificate with the role as its common name, logs in with it
// (pgx, psql), renews it before it expires (a second certificate is issued
// and the next session uses it, while the first session outlives its
// certificate), and when Vault cannot renew it, new sessions are refused
// clearly once it expired while the open one continues.
func TestCertAuthVaultPKI(t *testing.T) {
	pg := certPG(t)
	sim := vaultsim.New(vaultsim.Options{Logf: t.Logf})
	t.Cleanup(sim.Close)
	const ttl = 4 * time.Second
	sim.AddPKIRole("pki", "pgward-client", vaultsim.PKIRole{Issuer: pg.CA, CAPEM: pg.CA.CertPEM, TTL: time.Hour,
		AllowedCommonNames: []string{certUser}})
	h := newHarness(t, func(h *harness, c *Config) {
		tokenFile := filepath.Join(h.dir, "vault-token")
		if err := os.WriteFile(tokenFile, []byte(sim.RootToken()), 0o600); err != nil {
			t.Fatal(err)
		}
		c.Secrets.Vault = &vault.Config{
			Address: sim.Addr(),
			Timeout: 2 * time.Second,
			Auth:    vault.AuthConfig{Method: "token", TokenFile: tokenFile},
			Roles: map[string]map[string]vault.RoleConfig{
				"vcert": {certUser: {PKI: &vault.PKIConfig{Role: "pgward-client", TTL: ttl}}},
			},
		}
		up := certUpstream(pg)
		up.Secrets = "vault"
		c.Upstreams["vcert"] = up
		c.Grants = append(c.Grants, broker.Grant{Principal: "me", Upstream: "vcert", Roles: []string{certUser}})
	})
	ctx := context.Background()
	serialOf := func(conn interface {
		QueryRow(context.Context, string, ...any) pgx.Row
	}) string {
		t.Helper()
		var who, serial string
		if err := conn.QueryRow(ctx, "select current_user, client_serial::text from pg_stat_ssl where pid = pg_backend_pid()").Scan(&who, &serial); err != nil || who != certUser {
			t.Fatalf("session: %q %v", who, err)
		}
		return serial
	}

	first := h.connect(t, certUser, "vcert")
	s1 := serialOf(first)
	issued := sim.Issued()
	if len(issued) != 1 || issued[0].Serial != s1 || issued[0].CommonName != certUser || (issued[0].NotAfter.Sub(issued[0].Time)-ttl).Abs() > time.Second {
		t.Fatalf("issued %+v; session serial %s", issued, s1)
	}
	out, err := testenv.RunAs(uint32(os.Getuid()), uint32(os.Getgid()), "psql", "-XAt", "-c",
		"select client_serial from pg_stat_ssl where pid = pg_backend_pid()", h.dsn(certUser, "vcert")).CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != s1 {
		t.Fatalf("psql: %v %q, want serial %s (the cached certificate)", err, out, s1)
	}
	// The metrics: the certificate's expiry, and renewals by result (both
	// series there from the start, at 0).
	renewals := func(result string) float64 {
		t.Helper()
		v, ok := scrapeAll(t, h)[`pgward_client_cert_renewals_total{result="`+result+`",upstream="vcert"}`]
		if !ok {
			t.Fatalf("no pgward_client_cert_renewals_total series for vcert, result %s", result)
		}
		return v
	}
	// expiry is the gauge, which must be the not_after of a certificate
	// Vault issued (under load a renewal may already have come).
	expiry := func() time.Time {
		t.Helper()
		v := scrapeAll(t, h)[`pgward_client_cert_expiry_timestamp_seconds{role="`+certUser+`",upstream="vcert"}`]
		e := time.UnixMilli(int64(v * 1000))
		for _, c := range sim.Issued() {
			if c.NotAfter.Sub(e).Abs() < 10*time.Millisecond {
				return e
			}
		}
		t.Errorf("pgward_client_cert_expiry_timestamp_seconds = %v, the not_after of no certificate issued: %+v", e, sim.Issued())
		return e
	}
	if ok, failed := renewals("success"), renewals("failure"); ok != 0 || failed != 0 {
		t.Errorf("renewals before any: success %v failure %v", ok, failed)
	}
	expiry()

	// Renewed before it expires: at two thirds of its life.
	deadline := time.Now().Add(3 * ttl)
	for !strings.Contains(h.logs.String(), "vault pki certificate renewed") { // the sim records it before pgward has it
		if time.Now().After(deadline) {
			t.Fatal("no second certificate was issued")
		}
		time.Sleep(50 * time.Millisecond)
	}
	issued = sim.Issued()
	if issued[1].Time.After(issued[0].NotAfter) {
		t.Fatalf("renewed at %v, after the first certificate expired at %v", issued[1].Time, issued[0].NotAfter)
	}
	second := h.connect(t, certUser, "vcert")
	if s2 := serialOf(second); s2 != issued[1].Serial || s2 == s1 {
		t.Fatalf("second session used serial %s; issued %+v", s2, issued)
	}
	if n := renewals("success"); n < 1 {
		t.Errorf("pgward_client_cert_renewals_total{result=success} = %v after a renewal", n)
	}
	if e := expiry(); !e.After(issued[0].NotAfter) {
		t.Errorf("pgward_client_cert_expiry_timestamp_seconds = %v after the renewal, want a later one than the first certificate's %v", e, issued[0].NotAfter)
	}

	// Vault stops issuing: once the current certificate expired, new
	// sessions are refused with a message that says so; open sessions
	// (their TLS handshake is done) continue.
	remove := sim.Inject(vaultsim.Fault{Path: "pki/issue/", Status: 500, Errors: []string{"internal error"}})
	defer remove()
	last := sim.Issued()
	time.Sleep(time.Until(last[len(last)-1].NotAfter) + 500*time.Millisecond)
	e := connectErr(t, h.dsn(certUser, "vcert"))
	if e.Code != broker.CodeCannotConnect || !strings.Contains(e.Message, "client certificate expired") {
		t.Fatalf("after a failed renewal: %s %q", e.Code, e.Message)
	}
	for _, c := range []*pgx.Conn{first, second} {
		if _, err := c.Exec(ctx, "select 1"); err != nil {
			t.Fatalf("an open session ended with its certificate: %v", err)
		}
	}
	for end := time.Now().Add(3 * time.Second); !strings.Contains(h.logs.String(), "could not be renewed"); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatal("no ERROR line when the certificate expired unrenewed")
		}
	}
	if n := renewals("failure"); n < 1 {
		t.Errorf("pgward_client_cert_renewals_total{result=failure} = %v after renewals failed until expiry", n)
	}
	if e := expiry(); time.Now().Before(e) {
		t.Errorf("pgward_client_cert_expiry_timestamp_seconds = %v, in the future, after the certificate expired unrenewed", e)
	}

	// Vault back: the next session gets a new certificate.
	remove()
	third := h.connect(t, certUser, "vcert")
	if s3 := serialOf(third); s3 == s1 || s3 != sim.Issued()[len(sim.Issued())-1].Serial {
		t.Fatalf("third session serial %s", s3)
	}
}
