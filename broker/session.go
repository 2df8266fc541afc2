package broker

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgward/pgward/broker/secrets"
)

// Startup parameters: every one the client sends is forwarded upstream
// (where PostgreSQL accepts or refuses it, as it would directly), except
// those pgward owns:
//   - user, database: pgward names the login role and the real database;
//   - replication: refused (replication connections are not relayed);
//   - role, session_authorization (directly or in options): refused, the
//     session starts as the granted role;
//   - pgward.*: pgward.principal is the principal claim, directly or in
//     options; any other pgward.* name is refused.

// ownedParams are startup parameter names pgward sets itself upstream
// (PostgreSQL reads these names exactly, so they are compared exactly).
var ownedParams = map[string]bool{"user": true, "database": true, "replication": true}

// forbiddenSettings may not be set through startup parameters or options:
// they would let the client act as another role than the one it was granted.
var forbiddenSettings = map[string]bool{"role": true, "session_authorization": true}

// claimSetting is the startup option a client uses to claim a principal.
const claimSetting = "pgward.principal"

type identityResult struct {
	id  Identity
	err error
	dur time.Duration
}

// handle runs one client connection from accept to close. It owns c.
func (s *Server) handle(ctx context.Context, c net.Conn) {
	defer c.Close()
	st := s.state.Load()
	accepted := time.Now()
	_ = c.SetDeadline(accepted.Add(st.cfg.Listen.loginTimeout()))

	// Who is calling is learned from the kernel right away, while the
	// client's startup packet is read: the process may not live long.
	idc := make(chan identityResult, 1)
	go func() {
		t := time.Now()
		id, err := s.resolver.Resolve(ctx, c)
		idc <- identityResult{id, err, time.Since(t)}
	}()

	pkt, err := s.readStartup(c)
	if err != nil {
		r := <-idc
		if errors.Is(err, os.ErrDeadlineExceeded) {
			// A client that trickles its startup packet (slowloris) holds a
			// connection slot until listen.login_timeout, never longer.
			s.log.Warn("login timeout: closed a connection that did not finish its startup packet",
				"timeout", st.cfg.Listen.loginTimeout(), "uid", r.id.UID, "pid", r.id.PID, "exe", r.id.Exe)
			return
		}
		if errors.Is(err, errProtocol) {
			s.refuseStartup(ctx, c, accepted, err)
		} else if !errors.Is(err, io.EOF) {
			s.log.Debug("client left during startup", "err", err)
		}
		return
	}
	if pkt.kind == packetCancel {
		r := <-idc
		s.handleCancel(ctx, pkt, r)
		return
	}
	s.startSession(ctx, c, st, pkt, idc, accepted)
}

// readStartup reads startup packets, answering SSLRequest and GSSENCRequest
// with 'N', until a StartupMessage or CancelRequest.
func (s *Server) readStartup(c net.Conn) (*startupPacket, error) {
	for i := 0; ; i++ {
		pkt, err := readStartupPacket(c)
		if err != nil {
			return nil, err
		}
		switch pkt.kind {
		case packetSSL, packetGSSENC:
			if i >= 2 {
				return nil, fmt.Errorf("%w: repeated encryption requests", errProtocol)
			}
			if _, err := c.Write([]byte{'N'}); err != nil {
				return nil, err
			}
			continue
		}
		return pkt, nil
	}
}

// session is one relaying client session.
type session struct {
	srv   *Server
	info  SessionInfo
	claim string
	log   *slog.Logger // operational lines, with request_id, pid, uid, principal, sid
	ctx   context.Context
	obs   SessionObserver

	// clientApp is the client's own application_name, which its
	// ParameterStatus shows (the upstream's carries pgward's format).
	clientApp string
	upApp     string // the application_name pgward gave the upstream session

	client       net.Conn
	up           *upstreamConn
	ups          *upstream
	key          cancelKey
	lease        *secrets.Lease
	sessionReuse // connection reuse at session end (reuse.go)

	// cred is the session's credential: pg_terminate_backend at a forced
	// end authenticates with it (endsession.go).
	cred secrets.Credential
	endState
	live liveState // what Sessions shows (sessions.go)
	// roleReport: session_authorization / is_superuser changes the server
	// reported and no statement result carries yet (roles.go).
	roleMu       sync.Mutex
	roleReport   string
	roleReported atomic.Bool // roleReport is not empty

	termOnce sync.Once
	termMu   sync.Mutex
	termCode string
	termMsg  string
	reason   EndReason
	cause    string // SessionInfo.EndCause
}

// startSession runs one authentication request to its session and relays
// it: the data path of DESIGN.md §1, one named step each (login.go). A
// step that refuses has told the Observer and the client.
func (s *Server) startSession(ctx context.Context, c net.Conn, st *serverState, pkt *startupPacket, idc chan identityResult, accepted time.Time) {
	l := s.beginLogin(ctx, c, st, pkt, accepted)
	if !l.verifyIdentity(idc) || !l.authorize() {
		return
	}
	release, ok := l.admitSession()
	if !ok {
		return
	}
	defer release()
	if !l.fetchCredential() {
		return
	}
	defer l.releaseLease()
	if !l.authenticateUpstream() || !l.openSession() {
		return
	}
	sess := l.sess
	if sess.client != c {
		defer sess.client.Close() // the event loop's socket (handle closes c)
	}
	defer s.removeSession(sess)
	if !l.started() {
		return
	}
	sess.key = s.cancels.add(sess.up.pid, sess)
	defer s.cancels.remove(sess.key)
	// The login finished within login_timeout; the greeting gets its own
	// write deadline, as an error does (sendError), so a login that ended
	// just before the deadline is not closed without a word after it.
	_ = sess.client.SetWriteDeadline(time.Now().Add(2 * time.Second))
	if err := sess.greet(); err != nil {
		sess.up.conn.Close()
		sess.info.EndReason = EndClientClosed
		sess.info.End = time.Now()
		sess.obs.End(sess.ctx)
		return
	}
	_ = sess.client.SetDeadline(time.Time{})
	releaseLoginSlot(ctx) // logged in: the connection no longer holds a login slot
	sess.run()
}

// backendProblem names the kind of secrets backend failure, never its detail
// (which could carry a path or token).
func backendProblem(err error) string {
	switch {
	case errors.Is(err, secrets.ErrCertExpired):
		return "its client certificate expired and the backend could not issue a new one"
	case errors.Is(err, secrets.ErrNotFound):
		return "no credential is stored for it"
	case errors.Is(err, secrets.ErrDenied):
		return "the backend denied pgward access"
	case errors.Is(err, secrets.ErrUnavailable):
		return "the backend is unavailable"
	case errors.Is(err, context.DeadlineExceeded):
		return "the backend did not answer in time"
	}
	return "the backend failed"
}

// filterParams returns the startup parameters to forward upstream and
// the claimed principal, or the refusal of a parameter pgward owns. GUC
// names are case-insensitive in PostgreSQL, so the owned ones are matched
// lower-cased.
func filterParams(in map[string]string) (map[string]string, string, *ClientError) {
	out := map[string]string{}
	var claim string
	claimed := false
	setClaim := func(v string) *ClientError {
		if claimed && v != claim {
			return refuse(CodeProtocolViolation, ReasonProtocol,
				fmt.Sprintf("two different principals claimed (%q and %q)", claim, v),
				"Claim a principal once: either the pgward.principal startup parameter or -c pgward.principal= in options.")
		}
		claim, claimed = v, true
		return nil
	}
	if v, ok := in["replication"]; ok && v != "false" && v != "0" && v != "off" && v != "no" {
		return nil, "", refuse(CodeInvalidAuthorization, ReasonProtocol,
			"replication connections are not allowed through pgward", "Connect to the server directly for replication.")
	}
	for _, k := range slices.Sorted(maps.Keys(in)) {
		v := in[k]
		lk := strings.ToLower(k)
		switch {
		case ownedParams[k]:
		case k == "options":
			settings, order, err := parseOptions(v)
			if err != nil {
				return nil, "", refuse(CodeProtocolViolation, ReasonProtocol, "invalid startup options: "+err.Error(), "Pass settings as -c name=value.")
			}
			kept := order[:0:0]
			for _, name := range order {
				switch {
				case name == claimSetting:
					if e := setClaim(settings[name]); e != nil {
						return nil, "", e
					}
				case forbiddenSettings[name]:
					return nil, "", forbiddenSetting("startup option", name)
				case strings.HasPrefix(name, "pgward."):
					return nil, "", unknownPgwardSetting("startup option", name)
				default:
					kept = append(kept, name)
				}
			}
			if len(kept) > 0 {
				out[k] = formatOptions(settings, kept)
			}
		case lk == claimSetting:
			if e := setClaim(v); e != nil {
				return nil, "", e
			}
		case forbiddenSettings[lk]:
			return nil, "", forbiddenSetting("startup parameter", lk)
		case strings.HasPrefix(lk, "pgward."):
			return nil, "", unknownPgwardSetting("startup parameter", lk)
		default:
			out[k] = v
		}
	}
	return out, claim, nil
}

// setAppName replaces the client's application_name in params (under
// whatever spelling it sent) with the one format gives, and returns the
// client's own.
func setAppName(params map[string]string, format, principal, requestID string) string {
	var app string
	for k, v := range params {
		if strings.EqualFold(k, "application_name") {
			app = v
			delete(params, k)
		}
	}
	params["application_name"] = formatAppName(format, app, principal, requestID)
	return app
}

func forbiddenSetting(kind, name string) *ClientError {
	return refuse(CodeInsufficientPriv, ReasonProtocol,
		fmt.Sprintf("%s %q is not allowed through pgward: a session starts as the role its user parameter names, the one the pgward policy granted", kind, name),
		"Connect with user=<role>. Within a session the role can still change (SET ROLE) to roles it is a member of; pgward reports those memberships and flags such statements in its audit.")
}

func unknownPgwardSetting(kind, name string) *ClientError {
	return refuse(CodeUndefinedObject, ReasonProtocol,
		fmt.Sprintf("%s %q is not known to pgward: pgward.* names are pgward's, and the only one is %s", kind, name, claimSetting),
		"Remove it, or claim a principal with "+claimSetting+"=<name>.")
}

// clientErrorFor is what the client sees when getting its upstream
// session failed after the credential was accepted. A refused login is
// turned into pgward's own error elsewhere (the server's text about a
// failed authentication is not passed on, so nothing of the secret or of
// the server's authentication setup reaches the client). But once the
// server has sent AuthenticationOk, or when it refuses a startup
// parameter pgward set with set_config on a reused connection, its error
// is about the session the client asked for — an unknown parameter
// (42704), an invalid value (22023), a parameter that cannot be set
// (55P02), the database, a connection limit — and holds nothing of the
// credential: the client gets the server's SQLSTATE, message, detail and
// hint, as it would connecting directly. It returns nil for other errors.
func clientErrorFor(err error) *ClientError {
	var se *serverError
	if !errors.As(err, &se) || !(errors.Is(err, errSessionRefused) || errors.Is(err, errStartupParam)) {
		return nil
	}
	return &ClientError{Code: se.Code, Message: se.Message, Detail: se.Detail, Hint: se.Hint, Reason: ReasonUpstreamRejected}
}

// greet sends the client what a server sends after authentication.
func (sess *session) greet() error {
	var buf []byte
	buf, _ = (&pgproto3.AuthenticationOk{}).Encode(buf)
	names := make([]string, 0, len(sess.up.params))
	for k := range sess.up.params {
		names = append(names, k)
	}
	slices.Sort(names)
	for _, k := range names {
		v := sess.up.params[k]
		if k == "application_name" && v == sess.upApp {
			// The client sees the name it gave, as it would directly;
			// SHOW application_name shows pgward's (docs/config.md).
			// A value the server reports otherwise (set after the
			// login) is the server's, and passed on.
			v = sess.clientApp
		}
		buf, _ = (&pgproto3.ParameterStatus{Name: k, Value: v}).Encode(buf)
	}
	var key [4]byte
	binary.BigEndian.PutUint32(key[:], sess.key.secret)
	buf, _ = (&pgproto3.BackendKeyData{ProcessID: sess.up.pid, SecretKey: key[:]}).Encode(buf)
	buf, _ = (&pgproto3.ReadyForQuery{TxStatus: 'I'}).Encode(buf)
	_, err := sess.client.Write(buf)
	return err
}

// terminate ends the session from outside (shutdown, revoked grant, expired
// lease): the client gets an ErrorResponse at the next message boundary and
// both connections close. cause is for the operator (SessionInfo.EndCause).
func (sess *session) terminate(reason EndReason, code, msg, cause string) {
	sess.termOnce.Do(func() {
		sess.termMu.Lock()
		sess.reason, sess.termCode, sess.termMsg, sess.cause = reason, code, msg, cause
		parked := sess.connParked
		sess.termMu.Unlock()
		if parked {
			return // the connection is in the reuse pool, no longer this session's
		}
		// Closing the upstream ends the upstream→client pump, which tells the
		// client why at a message boundary, then closes the client.
		sess.up.conn.Close()
	})
}

func (sess *session) termination() (reason EndReason, code, msg string) {
	sess.termMu.Lock()
	defer sess.termMu.Unlock()
	return sess.reason, sess.termCode, sess.termMsg
}

func remoteString(c net.Conn) string {
	if a := c.RemoteAddr(); a != nil && a.String() != "" && a.String() != "@" {
		return a.String()
	}
	return "unix"
}
