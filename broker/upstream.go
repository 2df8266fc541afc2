package broker

import (
	"bytes"
	"context"
	"crypto/md5"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgward/pgward/broker/secrets"
)

// upstream is a configured Postgres server, ready to dial.
type upstream struct {
	name  string
	cfg   UpstreamConfig
	tls   *tls.Config    // nil when TLS is disabled
	scram *scramKeyCache // SCRAM keys of this upstream's credentials, dropped with it (at reload)
}

func newUpstream(name string, cfg UpstreamConfig) (*upstream, error) {
	u := &upstream{name: name, cfg: cfg, scram: newScramKeyCache()}
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
			return nil, fieldErr("upstreams."+name+".tls.cert_file", "cannot load the client certificate and key: %w", err)
		}
		tc.Certificates = []tls.Certificate{cert}
	}
	var pool *x509.CertPool
	if cfg.TLS.CAFile != "" {
		pem, err := os.ReadFile(cfg.TLS.CAFile)
		if err != nil {
			return nil, fieldErr("upstreams."+name+".tls.ca_file", "cannot read it: %w", err)
		}
		pool = x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fieldErr("upstreams."+name+".tls.ca_file", "%s holds no PEM certificate", cfg.TLS.CAFile)
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
	// pre holds bytes the server sent that were read along with the end
	// of the login (or of a statement of pgward's own) and belong to
	// the client: they are read before conn (Read) and the relay starts
	// with them.
	pre []byte
	// reuse is set when the connection may be parked at session end
	// (upstreams.<name>.reuse); see reuse.go.
	reuse *reuseState
}

// errUpstreamRejected means the upstream refused the stored credential.
var errUpstreamRejected = errors.New("upstream rejected the credential")

// errAuthMethodRefused means the upstream asked for a method not in the auth list.
var errAuthMethodRefused = errors.New("upstream asked for a refused authentication method")

// errSessionRefused means the upstream accepted the credential
// (AuthenticationOk) and then refused the session with an ErrorResponse,
// wrapped as a *serverError.
var errSessionRefused = errors.New("upstream refused the session after authentication")

// connect dials the upstream and authenticates as role with cred, forwarding
// the client's startup parameters (filterParams). It owns the connection until it
// returns it; on error nothing is left open.
//
// pgward speaks the startup itself (pgproto3 as the codec) rather than
// through pgconn, so that SCRAM's PBKDF2 result can be cached per (secret,
// salt, iterations) and reused by every later login: see scram.go. Only the
// methods in the upstream's auth list are answered (libpq's require_auth):
// a server that asks for anything else, or for nothing at all, is refused
// before the secret is sent.
//
// Whatever reads the login must leave nothing behind when the relay takes
// the connection over: no buffered bytes (see loginReader) and no other
// reader. pgconn.Connect plus Hijack, as pgward once did, breaks the second
// rule: when a login write is slow (a loaded machine), pgconn's background
// reader starts, reads the login's answer, and can be left blocked in a
// Read on the hijacked conn, where it takes the server's next answer and
// the session hangs (issue 8).
func (u *upstream) connect(ctx context.Context, role string, cred secrets.Credential, params map[string]string) (*upstreamConn, error) {
	user := cred.User
	if user == "" {
		user = role
	}
	network := "tcp"
	if u.cfg.IsSocketPath() {
		network = "unix"
	}
	target := u.cfg.Address
	d := net.Dialer{}
	raw, err := d.DialContext(ctx, network, target)
	if err != nil {
		return nil, fmt.Errorf("dial upstream: %w", err)
	}
	ok := false
	conn := raw
	defer func() {
		if !ok {
			conn.Close()
		}
	}()
	if dl, has := ctx.Deadline(); has {
		_ = raw.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { _ = raw.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	var tlsState *tls.ConnectionState
	tcfg, proof, err := u.tlsConfigFor(cred) // certauth.go
	if err != nil {
		return nil, err
	}
	if tcfg != nil {
		tc, err := startTLS(ctx, raw, tcfg)
		if err != nil {
			return nil, certRefusal(err, proof)
		}
		conn = tc
		st := tc.ConnectionState()
		tlsState = &st
	}

	// The Frontend buffers what it reads; it reads through lr, which never
	// hands it a byte past the message it is decoding, so what the server
	// sent behind ReadyForQuery is left in lr for the relay.
	lr := newLoginReader(conn)
	defer lr.release()
	fe := pgproto3.NewFrontend(lr, conn)
	// Login messages are small; this bounds what a hostile server can make
	// pgproto3 allocate up front before the relay (and its budget) starts.
	fe.SetMaxBodyLen(loginMaxBody)
	sp := &pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersionNumber, Parameters: map[string]string{
		"user": user, "database": u.cfg.database(u.name),
	}}
	for k, v := range params {
		if k != "user" && k != "database" {
			sp.Parameters[k] = v
		}
	}
	fe.Send(sp)
	if err := fe.Flush(); err != nil {
		return nil, fmt.Errorf("send startup message: %w", err)
	}
	methods := u.cfg.authMethods()
	allowed := func(m string) bool { return slices.Contains(methods, m) }
	pwMethods := slices.DeleteFunc(slices.Clone(methods), func(m string) bool { return m == AuthCert })
	requireCB := tlsState != nil && len(pwMethods) == 1 && pwMethods[0] == "scram-sha-256"
	password := cred.Password.Reveal()
	uc := &upstreamConn{params: map[string]string{}, tls: tlsState != nil, dialTarget: target}
	asked := false         // the server asked for a password in some form
	authenticated := false // AuthenticationOk seen
	var sc *scramClient
	for {
		msg, err := fe.Receive()
		if err != nil {
			return nil, certRefusal(fmt.Errorf("read from upstream during startup: %w", err), proof)
		}
		switch m := msg.(type) {
		case *pgproto3.AuthenticationCleartextPassword:
			if !allowed("password") || asked {
				return nil, fmt.Errorf("%w: cleartext password (auth: %v)", errAuthMethodRefused, methods)
			}
			asked = true
			fe.Send(&pgproto3.PasswordMessage{Password: password})
		case *pgproto3.AuthenticationMD5Password:
			if !allowed("md5") || asked {
				return nil, fmt.Errorf("%w: md5 (auth: %v)", errAuthMethodRefused, methods)
			}
			asked = true
			fe.Send(&pgproto3.PasswordMessage{Password: md5Password(user, password, m.Salt)})
		case *pgproto3.AuthenticationSASL:
			if !allowed("scram-sha-256") || asked {
				return nil, fmt.Errorf("%w: SASL (auth: %v)", errAuthMethodRefused, methods)
			}
			asked = true
			plus := tlsState != nil && slices.Contains(m.AuthMechanisms, scramMechPlus)
			if !plus && !slices.Contains(m.AuthMechanisms, scramMech) {
				return nil, fmt.Errorf("%w: SASL mechanisms %v", errAuthMethodRefused, m.AuthMechanisms)
			}
			if requireCB && !plus {
				return nil, fmt.Errorf("%w: server did not offer channel binding (SCRAM-SHA-256-PLUS) over TLS", errAuthMethodRefused)
			}
			var cb []byte
			if plus {
				if len(tlsState.PeerCertificates) == 0 {
					return nil, fmt.Errorf("%w: no server certificate for channel binding", errAuthMethodRefused)
				}
				if cb, err = tlsServerEndPoint(tlsState.PeerCertificates[0]); err != nil {
					if requireCB {
						return nil, fmt.Errorf("%w: %w", errAuthMethodRefused, err)
					}
					plus = false
				}
			}
			if sc, err = newSCRAMClient(u.scram, password, plus, cb, tlsState != nil); err != nil {
				return nil, err
			}
			mech := scramMech
			if plus {
				mech = scramMechPlus
			}
			fe.Send(&pgproto3.SASLInitialResponse{AuthMechanism: mech, Data: sc.first()})
		case *pgproto3.AuthenticationSASLContinue:
			if sc == nil || sc.authMessage != nil {
				return nil, fmt.Errorf("%w: unexpected SASLContinue", errProtocol)
			}
			final, err := sc.final(m.Data)
			if err != nil {
				return nil, err
			}
			fe.Send(&pgproto3.SASLResponse{Data: final})
		case *pgproto3.AuthenticationSASLFinal:
			if sc == nil || sc.authMessage == nil {
				return nil, fmt.Errorf("%w: unexpected SASLFinal", errProtocol)
			}
			if err := sc.verify(m.Data); err != nil {
				return nil, fmt.Errorf("%w: %w", errAuthMethodRefused, err)
			}
			sc.verified = true
			continue
		case *pgproto3.AuthenticationOk:
			switch {
			case !asked:
				// The server asked for no authentication: accepted only
				// with trust, or cert and a proven handshake (certauth.go).
				if err := u.noAuthAccepted(tlsState, proof); err != nil {
					return nil, err
				}
			case sc != nil && !sc.verified:
				// SCRAM must end with the server's proof (SASLFinal).
				return nil, fmt.Errorf("%w: AuthenticationOk before the server proved itself", errAuthMethodRefused)
			}
			authenticated = true
			continue
		case *pgproto3.ParameterStatus:
			uc.params[m.Name] = m.Value
			continue
		case *pgproto3.BackendKeyData:
			uc.pid, uc.secretKey = m.ProcessID, append([]byte(nil), m.SecretKey...)
			continue
		case *pgproto3.ReadyForQuery:
			if !authenticated {
				return nil, fmt.Errorf("%w: ReadyForQuery before authentication", errProtocol)
			}
			// The deadline-on-cancel callback must not run after the
			// deadline is cleared: if it has started, the login timed out.
			if !stop() {
				return nil, fmt.Errorf("upstream startup: %w", context.DeadlineExceeded)
			}
			if fe.ReadBufferLen() != 0 {
				return nil, fmt.Errorf("%w: login reader handed out bytes past ReadyForQuery", errProtocol)
			}
			ok = true
			uc.conn = conn
			// Bytes read behind ReadyForQuery (a NoticeResponse, a
			// ParameterStatus, a FATAL ErrorResponse…) are the start of
			// what the relay forwards.
			if rest := lr.rest(); len(rest) > 0 {
				uc.pre = bytes.Clone(rest)
			}
			_ = conn.SetDeadline(time.Time{})
			return uc, nil
		case *pgproto3.ErrorResponse:
			if authenticated {
				// After AuthenticationOk the credential has been
				// accepted and used: what the server refuses now is
				// the session it was asked for (a startup parameter
				// it does not know or whose value is invalid, the
				// database, a connection limit), and its message
				// holds nothing of the secret. See clientErrorFor.
				return nil, fmt.Errorf("%w: %w", errSessionRefused, &serverError{
					Code: m.Code, Message: m.Message, Detail: m.Detail, Hint: m.Hint, Fatal: true})
			}
			if err := certErrorResponse(proof, asked, m.Code, m.Message); err != nil {
				return nil, err
			}
			switch m.Code {
			case "28P01", "28000":
				return nil, fmt.Errorf("%w (SQLSTATE %s)", errUpstreamRejected, m.Code)
			}
			return nil, fmt.Errorf("upstream refused the connection (SQLSTATE %s)", m.Code)
		case *pgproto3.NoticeResponse, *pgproto3.NegotiateProtocolVersion:
			continue
		default:
			return nil, fmt.Errorf("%w: unexpected %T during startup", errProtocol, msg)
		}
		if err := fe.Flush(); err != nil {
			return nil, fmt.Errorf("send to upstream during startup: %w", err)
		}
	}
}

// Read reads what the server sent: first pre, then conn. pgward's own
// statements on the connection (reuse.go) read their answer through it, so
// that bytes read ahead during the login keep their place in the stream.
func (uc *upstreamConn) Read(p []byte) (int, error) {
	if len(uc.pre) > 0 {
		n := copy(p, uc.pre)
		uc.pre = uc.pre[n:]
		if len(uc.pre) == 0 {
			uc.pre = nil
		}
		return n, nil
	}
	return uc.conn.Read(p)
}

// loginMaxBody caps one message of the upstream's login (authentication
// requests, ParameterStatus, BackendKeyData, notices, errors): none is
// near this in practice, and pgproto3 allocates a body's announced length
// before reading it.
const loginMaxBody = 1 << 20

// loginReader reads the upstream's side of the login. It reads from conn
// as a buffered reader does (as much as one read returns, so a login costs
// no more syscalls than through the Frontend's own buffer) but never hands
// its caller a byte past the end of the current message: a
// pgproto3.Frontend reading through it holds nothing when it has returned
// ReadyForQuery, and whatever the server sent behind it in the same read is
// in rest, not lost in the Frontend's buffer.
type loginReader struct {
	conn net.Conn
	buf  *[]byte // borrowed from relayBufPool until release
	r, w int     // (*buf)[r:w] read from conn, not yet handed out
	left int64   // bytes of the current message not yet handed out; 0 at a boundary
}

func newLoginReader(c net.Conn) *loginReader {
	return &loginReader{conn: c, buf: relayBufPool.Get().(*[]byte)}
}

func (lr *loginReader) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if lr.left == 0 {
		// At a message boundary: the header says where the message ends.
		if err := lr.fill(5); err != nil {
			return 0, err
		}
		b := *lr.buf
		l := int64(int32(binary.BigEndian.Uint32(b[lr.r+1:])))
		// An invalid length (< 4) is the Frontend's to report: hand
		// it the header alone.
		lr.left = 5
		if l >= 4 {
			lr.left = 1 + l
		}
	}
	if lr.r == lr.w {
		if err := lr.fill(1); err != nil {
			return 0, err
		}
	}
	n := min(int64(len(p)), lr.left, int64(lr.w-lr.r))
	copy(p, (*lr.buf)[lr.r:lr.r+int(n)])
	lr.r += int(n)
	lr.left -= n
	return int(n), nil
}

// fill reads from conn until at least k bytes are buffered.
func (lr *loginReader) fill(k int) error {
	if lr.w-lr.r >= k {
		return nil
	}
	b := *lr.buf
	if lr.r > 0 {
		lr.w = copy(b, b[lr.r:lr.w])
		lr.r = 0
	}
	m, err := io.ReadAtLeast(lr.conn, b[lr.w:], k-lr.w)
	lr.w += m
	return err
}

// rest is what was read and not handed out: at a message boundary, the
// bytes the server sent behind the last message returned. It is valid
// until release.
func (lr *loginReader) rest() []byte { return (*lr.buf)[lr.r:lr.w] }

// release returns the buffer.
func (lr *loginReader) release() {
	if lr.buf != nil {
		relayBufPool.Put(lr.buf)
		lr.buf = nil
	}
}

// startTLS asks the server for TLS (SSLRequest) and runs the handshake. The
// server's answer is read one byte alone, so bytes a machine in the middle
// injects after it cannot end up inside the TLS session (CVE-2021-23222).
func startTLS(ctx context.Context, c net.Conn, cfg *tls.Config) (*tls.Conn, error) {
	req := appendUint32(appendUint32(nil, 8), codeSSLRequest)
	if _, err := c.Write(req); err != nil {
		return nil, fmt.Errorf("send SSLRequest: %w", err)
	}
	var b [1]byte
	if _, err := io.ReadFull(c, b[:]); err != nil {
		return nil, fmt.Errorf("read SSLRequest answer: %w", err)
	}
	if b[0] != 'S' {
		return nil, errors.New("upstream refused TLS")
	}
	tc := tls.Client(c, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		return nil, fmt.Errorf("tls handshake with upstream: %w", err)
	}
	return tc, nil
}

// md5Password is PostgreSQL's md5 password response.
func md5Password(user, password string, salt [4]byte) string {
	inner := md5.Sum([]byte(password + user))
	h := hex.EncodeToString(inner[:])
	outer := md5.Sum(append([]byte(h), salt[:]...))
	return "md5" + hex.EncodeToString(outer[:])
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
