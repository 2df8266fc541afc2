package broker

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgward/pgward/broker/secrets"
)

// A login is one authentication request on its way to a session: the steps
// startSession runs, in order. Each step either moves the request on or
// refuses it (refuse: the Observer is told once, then the client gets its
// ErrorResponse) and returns false.
type login struct {
	s        *Server
	st       *serverState
	c        net.Conn
	ctx      context.Context // the request's, from Observer.Begin
	obs      RequestObserver
	log      *slog.Logger // operational lines only; lifecycle events are the Observer's
	accepted time.Time

	pkt          *startupPacket
	role, dbname string
	req          AuthRequest
	info         SessionInfo

	id        Identity
	params    map[string]string // forwarded upstream
	claim     string
	ups       *upstream
	decision  Decision
	cred      secrets.Credential
	up        *upstreamConn
	reused    bool
	clientApp string
	sess      *session // once the session exists (it may take the lease with its connection)
}

// newRequestID mints a request id: 16 random bytes in hex, the shape of a
// W3C trace id (Observer.Begin may replace it with its trace's).
func newRequestID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// beginLogin opens the request with the Observer and names what it asks for.
func (s *Server) beginLogin(ctx context.Context, c net.Conn, st *serverState, pkt *startupPacket, accepted time.Time) *login {
	r := &Request{RequestID: newRequestID(), Start: accepted}
	ctx, obs := s.obs.Begin(ctx, r)
	l := &login{s: s, st: st, c: c, ctx: ctx, obs: obs, accepted: accepted, pkt: pkt,
		role: pkt.params["user"], dbname: pkt.params["database"]}
	if l.dbname == "" {
		l.dbname = l.role
	}
	l.log = s.log.With("request_id", r.RequestID)
	// Database is the name asked for until the upstream is known (then
	// the upstream's real database): a refusal is audited with it.
	l.info = SessionInfo{
		RequestID: r.RequestID, SessionID: newUUID(), Protocol: "postgres",
		Upstream: l.dbname, Database: l.dbname, User: l.role, Start: accepted,
		ApplicationName: pkt.params["application_name"],
	}
	l.req = AuthRequest{RequestID: r.RequestID, Upstream: l.dbname, Role: l.role, Durations: map[Stage]time.Duration{}}
	return l
}

// refuseStartup refuses a malformed startup packet: a request that never
// named what it wants, so there is no session to audit.
func (s *Server) refuseStartup(ctx context.Context, c net.Conn, accepted time.Time, err error) {
	r := &Request{RequestID: newRequestID(), Start: accepted}
	ctx, obs := s.obs.Begin(ctx, r)
	obs.Refused(ctx, &AuthRequest{RequestID: r.RequestID, Failure: ReasonProtocol, Cause: "malformed startup packet", Err: err,
		Durations: map[Stage]time.Duration{StageTotal: time.Since(accepted)}}, nil)
	sendError(c, refuse(CodeProtocolViolation, ReasonProtocol, "invalid startup packet: "+strings.TrimPrefix(err.Error(), errProtocol.Error()+": "), ""))
}

// refuse ends the request without a session: the Observer is told (audit,
// metrics, the one log line), then the client gets e.
func (l *login) refuse(e *ClientError, cause string, err error) bool {
	l.req.Failure, l.req.Cause, l.req.Err = e.Reason, cause, err
	l.req.Durations[StageTotal] = time.Since(l.accepted)
	l.info.Refusal = e.Reason
	l.info.Success, l.info.Code, l.info.Error = false, e.Code, e.Message
	l.obs.Refused(l.ctx, &l.req, &l.info)
	sendError(l.c, e)
	return false
}

// verifyIdentity waits for the identity resolved since accept.
func (l *login) verifyIdentity(idc <-chan identityResult) bool {
	ctx := l.obs.StageStart(l.ctx, StageIdentity)
	r := <-idc
	l.obs.StageEnd(ctx, StageIdentity, r.err)
	l.req.Verification.Attempted = true
	l.req.Durations[StageIdentity] = r.dur
	if r.err != nil {
		return l.refuse(refuse(CodeInvalidAuthorization, ReasonIdentity,
			"pgward could not verify the identity of the connecting process",
			"Connect from a process that stays alive during login, on this host's pgward socket."),
			"identity verification failed", r.err)
	}
	l.req.Verification.OK = true
	l.id, l.info.Identity, l.req.Identity = r.id, r.id, r.id
	l.log = l.log.With("pid", r.id.PID, "uid", r.id.UID)
	return true
}

// authorize reads the startup parameters, takes a throttling token and
// checks the policy: the upstream exists, a claimed principal matches, a
// grant allows the role.
func (l *login) authorize() bool {
	pkt, id := l.pkt, l.id
	if pkt.minor > 0 || len(pkt.unsupportedOptions) > 0 {
		buf, _ := (&pgproto3.NegotiateProtocolVersion{NewestMinorProtocol: 0, UnrecognizedOptions: pkt.unsupportedOptions}).Encode(nil)
		if _, err := l.c.Write(buf); err != nil {
			return false
		}
	}
	params, claim, perr := filterParams(pkt.params)
	l.params, l.claim = params, claim
	l.req.ClaimedPrincipal, l.info.ClaimedPrincipal = claim, claim

	// Throttling: every request takes a token before anything costly, from
	// its principal's bucket when a grant allows it, else from its uid's —
	// so a flood of refused requests from one uid is throttled too, and
	// leaves other principals alone.
	ups, upsOK := l.st.upstreams[l.dbname]
	var d Decision
	if upsOK && perr == nil {
		d = l.st.policy.Authorize(id, l.dbname, l.role, claim)
	}
	l.decision = d
	lkey := uidKey(id.UID)
	if d.Allowed {
		lkey = principalKey(d.Principal)
	}
	if lerr := l.s.limiter.admit(lkey); lerr != nil {
		return l.refuse(lerr, "throttled: too many authentication requests from "+lkey.String(), nil)
	}
	if perr != nil {
		return l.refuse(perr, "refused startup parameters", nil)
	}
	if !upsOK {
		return l.refuse(refuse(CodeUnknownDatabase, ReasonUnauthorized,
			fmt.Sprintf("pgward has no upstream named %q", l.dbname),
			"Set dbname to the name of an upstream in the pgward configuration ("+strings.Join(sortedKeys(l.st.upstreams), ", ")+")."),
			"unknown upstream requested", nil)
	}
	l.ups = ups
	l.info.Database = ups.cfg.database(l.dbname)
	l.info.URI = ups.cfg.Address
	l.req.Matched = d.Matched
	if d.ClaimAttempted {
		l.req.Matching = Check{Attempted: true, OK: !d.ClaimFailed}
	}
	if d.ClaimFailed {
		return l.refuse(refuse(CodeInvalidAuthorization, ReasonIdentity,
			fmt.Sprintf("the connecting process (%s) does not match claimed principal %q", id, claim),
			"Remove pgward.principal from the options, or connect from a process that principal's selectors match."),
			"claimed principal does not match the caller", nil)
	}
	if !d.Allowed {
		l.req.Unauthorized = true
		l.req.Retrieval.Attempted = true
		hint := "Add a grant of this role on this upstream to one of the caller's principals"
		if len(d.Matched) == 0 {
			hint = "Define a principal whose selectors match this process, and grant it the role"
		} else {
			hint += " (" + strings.Join(d.Matched, ", ") + ")"
		}
		return l.refuse(refuse(CodeInvalidAuthorization, ReasonUnauthorized,
			fmt.Sprintf("no grant lets %s use role %q on upstream %q", id, l.role, l.dbname),
			hint+" in the pgward policy."),
			"unauthorized request: no grant", nil)
	}
	l.info.Principal = d.Principal
	l.log = l.log.With("principal", d.Principal, "sid", l.info.SessionID)
	return true
}

// admitSession takes one of the principal's concurrent sessions
// (limits.sessions_per_principal); release gives it back.
func (l *login) admitSession() (release func(), ok bool) {
	release, lerr := l.s.limiter.acquire(l.decision.Principal)
	if lerr != nil {
		return nil, l.refuse(lerr, "throttled: too many sessions of "+principalKey(l.decision.Principal).String(), nil)
	}
	return release, true
}

// fetchCredential gets the real credential from the secrets backend.
func (l *login) fetchCredential() bool {
	l.req.Retrieval.Attempted = true
	ctx := l.obs.StageStart(l.ctx, StageCredentials)
	// A backend that hangs must not hold the login past listen.login_timeout.
	fctx, cancel := context.WithDeadline(ctx, l.accepted.Add(l.st.cfg.Listen.loginTimeout()))
	t := time.Now()
	cred, err := fetchCredential(fctx, l.s.secrets, l.ups.cfg, l.dbname, l.role) // certauth.go
	cancel()
	l.req.Durations[StageCredentials] = time.Since(t)
	l.obs.StageEnd(ctx, StageCredentials, err)
	if err != nil {
		code := CodeCannotConnect
		if errors.Is(err, secrets.ErrDenied) || errors.Is(err, secrets.ErrNotFound) {
			code = CodeInvalidAuthorization
		}
		return l.refuse(refuse(code, ReasonBackendError,
			fmt.Sprintf("pgward could not get the credential for role %q on upstream %q from its secrets backend: %s", l.role, l.dbname, backendProblem(err)),
			"Check the secrets backend and that it holds this role's credential."),
			"credential fetch failed", err)
	}
	l.req.Retrieval.OK = true
	l.cred = cred
	return true
}

// releaseLease gives the credential's lease back, unless the session's
// upstream connection was parked for reuse and took it along.
func (l *login) releaseLease() {
	if lease := l.cred.Lease; lease != nil && lease.Release != nil && (l.sess == nil || !l.sess.leaseParked) {
		lease.Release()
	}
}

// authenticateUpstream logs in upstream with the credential (or takes a
// parked connection of the same credential), then learns and applies what
// the credential's role can become (roles.go).
func (l *login) authenticateUpstream() bool {
	// The upstream session's application_name carries the caller.
	l.clientApp = setAppName(l.params, l.ups.cfg.applicationName(), l.decision.Principal, l.info.RequestID)
	ctx := l.obs.StageStart(l.ctx, StageUpstreamAuth)
	uctx, cancel := context.WithDeadline(ctx, l.upstreamDeadline())
	t := time.Now()
	up, reused, err := l.s.upstreamFor(uctx, l.ups, l.role, l.cred, l.params)
	cancel()
	l.req.Durations[StageUpstreamAuth] = time.Since(t)
	l.obs.StageEnd(ctx, StageUpstreamAuth, err)
	if err != nil {
		return l.refuseUpstream(err)
	}
	rctx, rcancel := context.WithDeadline(l.ctx, l.upstreamDeadline())
	ce, cause, err := l.s.checkRoles(rctx, l.ups, l.role, l.cred, up, &l.info, l.log)
	rcancel()
	if ce != nil {
		up.conn.Close()
		return l.refuse(ce, cause, err)
	}
	l.up, l.reused = up, reused
	return true
}

// upstreamDeadline bounds a step of the upstream login: the upstream's
// connect_timeout, and listen.login_timeout from the client's accept. Past
// the login deadline the client's connection is past its deadline too: a
// session started then could not greet the client, which would see its
// connection closed without a word (under load, with an upstream slower
// than login_timeout, that happened to every such login); refused before
// it, the client is told why.
func (l *login) upstreamDeadline() time.Time {
	d := time.Now().Add(l.ups.cfg.connectTimeout())
	if login := l.accepted.Add(l.st.cfg.Listen.loginTimeout()); login.Before(d) {
		return login
	}
	return d
}

func (l *login) refuseUpstream(err error) bool {
	dbname, role := l.dbname, l.role
	switch ce := clientErrorFor(err); {
	case ce != nil:
		return l.refuse(ce, "upstream refused the session the client asked for", err)
	case certClientError(err, dbname, role) != nil:
		return l.refuse(certClientError(err, dbname, role), "upstream client-certificate authentication failed", err)
	case errors.Is(err, errUpstreamRejected):
		return l.refuse(refuse(CodeInvalidPassword, ReasonUpstreamRejected,
			fmt.Sprintf("upstream %q rejected the credential pgward holds for role %q", dbname, role),
			"Check the secrets backend: the stored password may be wrong or expired."),
			"upstream rejected the stored credential", err)
	case errors.Is(err, errAuthMethodRefused):
		return l.refuse(refuse(CodeCannotConnect, ReasonUpstreamRejected,
			fmt.Sprintf("upstream %q asked for an authentication method pgward does not allow for it", dbname),
			authMethodHint(dbname)),
			"upstream asked for a refused authentication method", err)
	default:
		return l.refuse(refuse(CodeCannotConnect, ReasonBackendError,
			fmt.Sprintf("pgward could not connect to upstream %q", dbname),
			"Check that the upstream server is running and reachable from the pgward host."),
			"upstream connection failed", err)
	}
}

// openSession makes the session and registers it with the server; it
// refuses when the server is shutting down.
func (l *login) openSession() bool {
	l.attachLoop()
	l.sess = &session{
		srv: l.s, info: l.info, claim: l.claim, log: l.log, ctx: l.ctx,
		client: l.c, up: l.up, ups: l.ups, lease: l.cred.Lease, cred: l.cred,
		clientApp: l.clientApp, upApp: l.params["application_name"],
	}
	l.sess.reused = l.reused
	if !l.s.addSession(l.sess) {
		l.up.conn.Close()
		if lc, ok := l.c.(*loopConn); ok {
			defer lc.Close() // after the refusal is sent (handle closes only the original)
		}
		return l.refuse(refuse(CodeAdminShutdown, "", "pgward is shutting down", "Reconnect in a moment."), "refused: shutting down", nil)
	}
	return true
}

// attachLoop moves the client and upstream sockets to the event loop
// (listen.event_loop, eventloop.go) when both are plain sockets; else the
// session relays with a goroutine per direction.
func (l *login) attachLoop() {
	if !l.st.cfg.Listen.EventLoop || !loopable(l.c) || !loopable(l.up.conn) {
		return
	}
	var loop *eventLoop
	var err error
	if lc, ok := l.up.conn.(*loopConn); ok {
		loop = lc.loop // a reused upstream stays on its loop; the client joins it
	} else {
		loop, err = pickLoop()
	}
	if err != nil {
		l.log.Warn("event loop unavailable; relaying with goroutines", "err", err)
		return
	}
	up, ok, err := loop.attach(l.up.conn)
	if !ok {
		if err != nil {
			l.log.Warn("event loop: could not take the upstream socket; relaying with goroutines", "err", err)
		}
		return
	}
	l.up.conn = up
	c, ok, err := loop.attach(l.c)
	if !ok {
		if err != nil {
			l.log.Warn("event loop: could not take the client socket; relaying with goroutines", "err", err)
		}
		return
	}
	l.c = c
}

func loopable(c net.Conn) bool {
	switch c.(type) {
	case *net.UnixConn, *net.TCPConn, *loopConn:
		return true
	}
	return false
}

// started tells the Observer the session starts (its audit record, durable
// before the client is greeted); an audit failure refuses it with 58030.
func (l *login) started() bool {
	sess := l.sess
	sess.info.Success = true
	l.req.Durations[StageTotal] = time.Since(l.accepted)
	obs, err := l.obs.Started(l.ctx, &l.req, &sess.info)
	if err != nil {
		l.up.conn.Close()
		sendError(l.c, refuse(CodeIOError, "", "pgward's audit log is unavailable, so no session can start", "Ask the operator to check pgward's audit log destination."))
		return false
	}
	sess.obs = obs
	return true
}
