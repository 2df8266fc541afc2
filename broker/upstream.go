package broker

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgward/pgward/broker/secrets"
)

// upstream is a configured Postgres server, ready to dial.
type upstream struct {
	name string
	cfg  UpstreamConfig
	tls  *tls.Config // nil when TLS is disabled
}

func newUpstream(name string, cfg UpstreamConfig) (*upstream, error) {
	u := &upstream{name: name, cfg: cfg}
	mode := cfg.tlsMode()
	if mode == "disable" {
		return u, nil
	}
	tc := &tls.Config{MinVersion: tls.VersionTLS12}
	host, _, _ := net.SplitHostPort(cfg.Address)
	tc.ServerName = host
	if cfg.TLS.ServerName != "" {
		tc.ServerName = cfg.TLS.ServerName
	}
	if cfg.TLS.CertFile != "" {
		cert, err := tls.LoadX509KeyPair(cfg.TLS.CertFile, cfg.TLS.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("upstream %s: load client certificate: %w", name, err)
		}
		tc.Certificates = []tls.Certificate{cert}
	}
	var pool *x509.CertPool
	if cfg.TLS.CAFile != "" {
		pem, err := os.ReadFile(cfg.TLS.CAFile)
		if err != nil {
			return nil, fmt.Errorf("upstream %s: read tls.ca_file: %w", name, err)
		}
		pool = x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("upstream %s: tls.ca_file %s holds no PEM certificate", name, cfg.TLS.CAFile)
		}
	}
	switch mode {
	case "require":
		// Encrypt, without verifying who answers (libpq's require without a root cert).
		tc.InsecureSkipVerify = true
	case "verify-ca":
		// Verify the chain but not the host name.
		tc.InsecureSkipVerify = true
		tc.VerifyConnection = func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("upstream presented no certificate")
			}
			opts := x509.VerifyOptions{Roots: pool, Intermediates: x509.NewCertPool()}
			for _, c := range cs.PeerCertificates[1:] {
				opts.Intermediates.AddCert(c)
			}
			_, err := cs.PeerCertificates[0].Verify(opts)
			return err
		}
	case "verify-full":
		tc.RootCAs = pool
	}
	u.tls = tc
	return u, nil
}

// upstreamConn is an authenticated upstream connection taken over from pgconn.
type upstreamConn struct {
	conn       net.Conn
	pid        uint32
	secretKey  []byte
	params     map[string]string
	tls        bool
	dialTarget string // network address, for cancel requests
}

// errUpstreamRejected means the upstream refused the stored credential.
var errUpstreamRejected = errors.New("upstream rejected the credential")

// errAuthMethodRefused means the upstream asked for a method not in the auth list.
var errAuthMethodRefused = errors.New("upstream asked for a refused authentication method")

// connect dials the upstream and authenticates as role with cred, forwarding
// the allowlisted startup parameters. It owns the connection until it
// returns it; on error nothing is left open.
func (u *upstream) connect(ctx context.Context, role string, cred secrets.Credential, params map[string]string) (*upstreamConn, error) {
	user := cred.User
	if user == "" {
		user = role
	}
	// A fully specified connection string, so no PG* environment variable or
	// service file of the agent's can change what is dialled.
	cfg, err := pgconn.ParseConfig("host=/nonexistent port=5432 sslmode=disable user=x dbname=x")
	if err != nil {
		return nil, fmt.Errorf("upstream %s: %w", u.name, err)
	}
	cfg.User = user
	cfg.Password = cred.Password.Reveal()
	cfg.Database = u.cfg.database(u.name)
	cfg.ConnectTimeout = u.cfg.connectTimeout()
	cfg.RuntimeParams = params
	cfg.Fallbacks = nil
	cfg.RequireAuth = strings.Join(u.cfg.authMethods(), ",")
	cfg.MaxProtocolMessageBodyLen = DefaultMaxMessageSize
	cfg.OnNotice = nil
	cfg.OnNotification = nil
	cfg.TLSConfig = u.tls
	cfg.ChannelBinding = "prefer"
	if u.tls != nil && len(u.cfg.authMethods()) == 1 && u.cfg.authMethods()[0] == "scram-sha-256" {
		// SCRAM over TLS: insist on SCRAM-SHA-256-PLUS, so a machine in the
		// middle with another certificate cannot relay our exchange.
		cfg.ChannelBinding = "require"
	}
	target := u.cfg.Address
	network := "tcp"
	if u.cfg.IsSocketPath() {
		network = "unix"
	} else {
		host, port, _ := net.SplitHostPort(u.cfg.Address)
		p, _ := strconv.ParseUint(port, 10, 16)
		cfg.Host, cfg.Port = host, uint16(p)
	}
	dialer := &net.Dialer{}
	cfg.DialFunc = func(ctx context.Context, _, _ string) (net.Conn, error) {
		return dialer.DialContext(ctx, network, target)
	}
	cfg.LookupFunc = func(ctx context.Context, host string) ([]string, error) { return []string{host}, nil }

	pc, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, classifyConnectError(err)
	}
	hc, err := pc.Hijack()
	if err != nil {
		pc.Close(context.Background())
		return nil, fmt.Errorf("take over upstream connection: %w", err)
	}
	return &upstreamConn{
		conn:       hc.Conn,
		pid:        hc.PID,
		secretKey:  hc.SecretKey,
		params:     hc.ParameterStatuses,
		tls:        hc.TLSConfig != nil,
		dialTarget: target,
	}, nil
}

// classifyConnectError turns pgconn's error into one of ours without its
// text, which could name the server's internals. The wrapped cause is kept for
// the log, never for the client.
func classifyConnectError(err error) error {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		switch pgErr.Code {
		case "28P01", "28000":
			return fmt.Errorf("%w (SQLSTATE %s)", errUpstreamRejected, pgErr.Code)
		}
		return fmt.Errorf("upstream refused the connection (SQLSTATE %s)", pgErr.Code)
	}
	msg := err.Error()
	if strings.Contains(msg, "require_auth") || strings.Contains(msg, "channel binding") {
		return fmt.Errorf("%w: %s", errAuthMethodRefused, msg)
	}
	return fmt.Errorf("dial upstream: %w", err)
}

// cancel sends a CancelRequest for the upstream backend. Like libpq it does
// so in plaintext on a new connection.
func (u *upstream) cancel(ctx context.Context, pid uint32, key []byte) error {
	network := "tcp"
	if u.cfg.IsSocketPath() {
		network = "unix"
	}
	d := net.Dialer{Timeout: u.cfg.connectTimeout()}
	c, err := d.DialContext(ctx, network, u.cfg.Address)
	if err != nil {
		return fmt.Errorf("dial upstream %s for cancel: %w", u.name, err)
	}
	defer c.Close()
	buf := make([]byte, 0, 12+len(key))
	buf = appendUint32(buf, uint32(12+len(key)))
	buf = appendUint32(buf, codeCancelRequest)
	buf = appendUint32(buf, pid)
	buf = append(buf, key...)
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	if _, err := c.Write(buf); err != nil {
		return fmt.Errorf("send cancel to upstream %s: %w", u.name, err)
	}
	// The server closes without answering; wait for that so the cancel is
	// processed before we report it forwarded.
	var b [1]byte
	_, _ = c.Read(b[:])
	return nil
}

func appendUint32(b []byte, v uint32) []byte {
	return append(b, byte(v>>24), byte(v>>16), byte(v>>8), byte(v))
}
