package broker

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"

	"github.com/pgward/pgward/broker/secrets"
)

// Upstream authentication methods that send no secret: the server lets
// pgward in without a password exchange (AuthenticationOk straight after
// the startup message). pgward accepts that only when one of these is in
// the upstream's auth list, and for cert only when the TLS handshake proved
// both sides (see noAuthAccepted).
const (
	// AuthCert is TLS client-certificate authentication (pg_hba "cert",
	// or any method with clientcert=verify-full): pgward presents the
	// credential's client certificate over a verify-full TLS connection.
	AuthCert = "cert"
	// AuthTrust accepts a server that asks for no authentication at all
	// (pg_hba "trust", "peer" on a socket file): an explicit opt-in,
	// logged at WARN at every start and reload.
	AuthTrust = "trust"
)

// checkAuth validates how the methods of upstreams.<name>.auth go together
// (p is "upstreams.<name>"); each value is checked against AuthMethods.
func checkAuth(p string, u UpstreamConfig, add func(error)) {
	if slices.Contains(u.Auth, AuthTrust) && len(u.Auth) > 1 {
		// With another method listed, that method's promise (the server
		// proves it knows the secret, or checks pgward's certificate) would
		// be void: any server, or a machine in the middle, could answer
		// AuthenticationOk. Say one thing.
		add(fieldErr(p+".auth", "trust cannot be combined with other methods: list it alone (the server asks for nothing) or leave it out"))
	}
	if slices.Contains(u.Auth, AuthCert) {
		switch {
		case u.IsSocketPath():
			add(fieldErr(p+".auth", "cert needs TLS, which a socket file does not have: use a host:port address with tls.mode verify-full"))
		case u.tlsMode() != "verify-full":
			add(fieldErr(p+".tls.mode", "is %s, but auth lists cert, which needs verify-full: pgward presents its client certificate only to a server whose certificate and host name it verified", u.tlsMode()))
		}
	}
}

// trustWarning is what is said, at every start and reload and by `pgward
// check-config`, about an upstream whose auth list has trust.
const trustWarning = "lists trust: pgward accepts this server without any authentication, so whoever answers at its address gets the sessions (and their statements) for every role granted on it"

// warnTrust logs, at every start and reload, each upstream that accepts a
// server asking for no authentication.
func warnTrust(log *slog.Logger, cfg Config) {
	for _, name := range sortedKeys(cfg.Upstreams) {
		if slices.Contains(cfg.Upstreams[name].Auth, AuthTrust) {
			log.Warn("upstream auth "+trustWarning, "upstream", name, "address", cfg.Upstreams[name].Address)
		}
	}
}

// fetchCredential asks src for the role's credential, except on an upstream
// whose auth list is [trust]: the server asks for nothing, so there is
// nothing to fetch (and no dummy secret to store).
func fetchCredential(ctx context.Context, src secrets.Source, u UpstreamConfig, upstream, role string) (secrets.Credential, error) {
	if len(u.Auth) == 1 && u.Auth[0] == AuthTrust {
		return secrets.Credential{}, nil
	}
	return src.Fetch(ctx, upstream, role)
}

// errNoClientCert means the auth list has cert and the secrets backend gave
// no client certificate for the role.
var errNoClientCert = errors.New("the secrets backend holds no client certificate for this role")

// errCertRejected means the upstream refused the client certificate pgward
// presented: a TLS alert (expired, unknown CA, revoked…) or, before
// AuthenticationOk, an authentication ErrorResponse (wrong common name).
var errCertRejected = errors.New("upstream rejected the client certificate")

// certRejection is errCertRejected with what the server said: its SQLSTATE
// (28000 for a TLS refusal) and a message about pgward's certificate, which
// holds nothing secret.
type certRejection struct {
	code, detail string
}

func (e *certRejection) Error() string {
	return fmt.Sprintf("%s (SQLSTATE %s): %s", errCertRejected, e.code, e.detail)
}
func (e *certRejection) Unwrap() error { return errCertRejected }

// certProof records what the TLS handshake with the upstream proved.
type certProof struct {
	cert      *secrets.ClientCert // nil unless the auth list has cert
	presented bool                // the server asked for the certificate and got it
}

// tlsConfigFor is u.tls, with the credential's client certificate when the
// auth list has cert (it replaces tls.cert_file). The returned proof is set
// during the handshake; it belongs to one connection.
func (u *upstream) tlsConfigFor(cred secrets.Credential) (*tls.Config, *certProof, error) {
	proof := &certProof{}
	if u.tls == nil || !slices.Contains(u.cfg.authMethods(), AuthCert) {
		return u.tls, proof, nil
	}
	if cred.Cert == nil {
		if cred.Password.Empty() {
			return nil, nil, errNoClientCert
		}
		// A password-only credential: the other methods listed may serve.
		return u.tls, proof, nil
	}
	proof.cert = cred.Cert
	tc := u.tls.Clone()
	tc.Certificates = nil
	tc.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
		proof.presented = true
		return cred.Cert.TLSCertificate(), nil
	}
	return tc, proof, nil
}

// noAuthAccepted decides an AuthenticationOk that came with no
// authentication request: accepted when the auth list has trust, or has
// cert and this connection is verify-full TLS on which the server asked for
// pgward's client certificate and got it. Otherwise it says why not.
func (u *upstream) noAuthAccepted(tlsState *tls.ConnectionState, proof *certProof) error {
	methods := u.cfg.authMethods()
	switch {
	case slices.Contains(methods, AuthTrust):
		return nil
	case !slices.Contains(methods, AuthCert):
		return fmt.Errorf("%w: server requested no authentication (auth: %v; trust is not listed)", errAuthMethodRefused, methods)
	case tlsState == nil || u.cfg.tlsMode() != "verify-full" || len(tlsState.VerifiedChains) == 0:
		return fmt.Errorf("%w: server requested no authentication and the connection is not verify-full TLS", errAuthMethodRefused)
	case proof == nil || !proof.presented:
		return fmt.Errorf("%w: server requested no authentication and did not ask for pgward's client certificate", errAuthMethodRefused)
	}
	return nil
}

// certRefusal turns an error of the TLS layer (a handshake, or the first
// read after it: TLS 1.3 servers check the client's certificate after the
// client's side of the handshake is done) into errCertRejected when pgward
// presented a certificate and the server answered with a TLS alert.
func certRefusal(err error, proof *certProof) error {
	var op *net.OpError
	if proof == nil || !proof.presented || !errors.As(err, &op) || op.Op != "remote error" {
		return err
	}
	return fmt.Errorf("%w: %w", &certRejection{code: CodeInvalidAuthorization, detail: "the server refused it in the TLS handshake: " + op.Err.Error()}, err)
}

// certErrorResponse is errCertRejected for an authentication ErrorResponse
// the server sent, before AuthenticationOk, to a login that presented a
// certificate and sent no secret: the server's message is about the
// certificate (such as `certificate authentication failed for user "x"`).
func certErrorResponse(proof *certProof, asked bool, code, msg string) error {
	if proof == nil || !proof.presented || asked || (code != "28000" && code != "28P01") {
		return nil
	}
	return &certRejection{code: code, detail: msg}
}

// certClientError is what the client sees for errNoClientCert and
// errCertRejected.
func certClientError(err error, upstream, role string) *ClientError {
	var cr *certRejection
	switch {
	case errors.Is(err, errNoClientCert):
		return &ClientError{Code: CodeInvalidAuthorization, Reason: ReasonBackendError,
			Message: fmt.Sprintf("upstream %q authenticates pgward by client certificate, and the secrets backend holds none for role %q", upstream, role),
			Hint:    "Give the role a cert and key (file backend) or a pki mapping (Vault) in pgward's secrets backend."}
	case errors.As(err, &cr):
		return &ClientError{Code: cr.code, Reason: ReasonUpstreamRejected,
			Message: fmt.Sprintf("upstream %q refused the client certificate pgward presented for role %q", upstream, role),
			Detail:  cr.detail,
			Hint:    "The certificate must be valid now, signed by a CA in the server's ssl_ca_file, and its common name must be the role (or map to it in pg_ident.conf)."}
	}
	return nil
}

// authMethodHint is the hint for errAuthMethodRefused.
func authMethodHint(upstream string) string {
	return "Allow the method in upstreams." + upstream + ".auth, or configure the server for SCRAM-SHA-256. A server that asks for no authentication is accepted only with cert (client certificate over verify-full TLS) or trust listed."
}
