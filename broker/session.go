package broker

import (
	"context"
	"crypto/rand"
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
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

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
			s.log.Warn("malformed startup packet", "err", err, "remote", remoteString(c))
			sendError(c, refuse(CodeProtocolViolation, ReasonProtocol, "invalid startup packet: "+strings.TrimPrefix(err.Error(), errProtocol.Error()+": "), ""))
			s.obs.Auth(ctx, &AuthRequest{Failure: ReasonProtocol})
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
	log   *slog.Logger
	span  trace.Span
	ctx   context.Context

	// clientApp is the client's own application_name, which its
	// ParameterStatus shows (the upstream's carries pgward's format).
	clientApp string
	upApp     string // the application_name pgward gave the upstream session

	client net.Conn
	up     *upstreamConn
	ups    *upstream
	key    cancelKey
	lease  *secrets.Lease
	// leaseParked: the upstream connection was parked for reuse and took
	// this session's lease reference with it (see reuse.go).
	leaseParked bool
	reused      bool // the upstream connection came from the reuse pool
	// Connection reuse at session end (relay.go, reuse.go).
	parking    atomic.Bool // the upstream pump is being stopped to park the connection
	upIdle     bool        // set by the upstream pump when it ends: last message ReadyForQuery 'I'
	clientIdle bool        // set by the client pump: Terminate came after a complete request
	connParked bool        // the upstream connection went to the reuse pool; under termMu

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
	reason   string
}

func (s *Server) startSession(ctx context.Context, c net.Conn, st *serverState, pkt *startupPacket, idc chan identityResult, accepted time.Time) {
	ctx, span := s.tracer.Start(ctx, "pgward.session", trace.WithSpanKind(trace.SpanKindServer))
	defer span.End()
	reqID := span.SpanContext().TraceID().String()
	if !span.SpanContext().TraceID().IsValid() {
		var b [16]byte
		_, _ = rand.Read(b[:])
		reqID = trace.TraceID(b).String()
	}
	span.SetAttributes(attribute.String("pgward.request_id", reqID))
	log := s.log.With("request_id", reqID)

	role := pkt.params["user"]
	dbname := pkt.params["database"]
	if dbname == "" {
		dbname = role
	}
	// Database is the name asked for until the upstream is known (then
	// the upstream's real database): a refusal is audited with it.
	info := SessionInfo{
		RequestID: reqID, SessionID: newUUID(), Protocol: "postgres",
		Upstream: dbname, Database: dbname, User: role, Start: accepted,
		ApplicationName: pkt.params["application_name"],
	}
	req := &AuthRequest{RequestID: reqID, Upstream: dbname, Role: role, Durations: map[Stage]time.Duration{}}
	fail := func(e *ClientError, level slog.Level, logMsg string, attrs ...any) {
		req.Failure = e.Reason
		info.Refusal = e.Reason
		req.Durations[StageTotal] = time.Since(accepted)
		info.Success, info.Code, info.Error = false, e.Code, e.Message
		log.Log(ctx, level, logMsg, append(attrs, "sqlstate", e.Code, "role", role, "upstream", dbname)...)
		span.SetStatus(codes.Error, e.Code)
		_ = s.obs.SessionStart(ctx, &info)
		s.obs.Auth(ctx, req)
		sendError(c, e)
	}

	authCtx, authSpan := s.tracer.Start(ctx, "pgward.auth")
	defer authSpan.End()

	// Identity.
	_, idSpan := s.tracer.Start(authCtx, "identity.verify")
	r := <-idc
	idSpan.End()
	req.Verification.Attempted = true
	req.Durations[StageIdentity] = r.dur
	if r.err != nil {
		idSpan.SetStatus(codes.Error, "identity verification failed")
		fail(refuse(CodeInvalidAuthorization, ReasonIdentity,
			"pgward could not verify the identity of the connecting process",
			"Connect from a process that stays alive during login, on this host's pgward socket."),
			slog.LevelWarn, "identity verification failed", "err", r.err)
		return
	}
	req.Verification.OK = true
	id := r.id
	info.Identity = id
	req.Identity = id
	log = log.With("pid", id.PID, "uid", id.UID)

	// Protocol details and startup parameters.
	if pkt.minor > 0 || len(pkt.unsupportedOptions) > 0 {
		buf, _ := (&pgproto3.NegotiateProtocolVersion{NewestMinorProtocol: 0, UnrecognizedOptions: pkt.unsupportedOptions}).Encode(nil)
		if _, err := c.Write(buf); err != nil {
			return
		}
	}
	params, claim, perr := filterParams(pkt.params)
	req.ClaimedPrincipal, info.ClaimedPrincipal = claim, claim

	// Throttling: every request takes a token before anything costly, from
	// its principal's bucket when a grant allows it, else from its uid's —
	// so a flood of refused requests from one uid is throttled too, and
	// leaves other principals alone.
	ups, upsOK := st.upstreams[dbname]
	var d Decision
	if upsOK && perr == nil {
		d = st.policy.Authorize(id, dbname, role, claim)
	}
	lkey := uidKey(id.UID)
	if d.Allowed {
		lkey = principalKey(d.Principal)
	}
	if lerr := s.limiter.admit(lkey); lerr != nil {
		fail(lerr, slog.LevelWarn, "throttled: too many authentication requests", "caller", lkey.String(), "identity", id.String())
		return
	}

	if perr != nil {
		fail(perr, slog.LevelWarn, "refused startup parameters", "err", perr.Message, "identity", id.String())
		return
	}

	// Upstream and policy.
	if !upsOK {
		fail(refuse(CodeUnknownDatabase, ReasonUnauthorized,
			fmt.Sprintf("pgward has no upstream named %q", dbname),
			"Set dbname to the name of an upstream in the pgward configuration ("+strings.Join(sortedKeys(st.upstreams), ", ")+")."),
			slog.LevelWarn, "unknown upstream requested", "identity", id.String())
		return
	}
	info.Database = ups.cfg.database(dbname)
	info.URI = ups.cfg.Address
	if d.ClaimAttempted {
		req.Matching = Check{Attempted: true, OK: !d.ClaimFailed}
	}
	if d.ClaimFailed {
		fail(refuse(CodeInvalidAuthorization, ReasonIdentity,
			fmt.Sprintf("the connecting process (%s) does not match claimed principal %q", id, claim),
			"Remove pgward.principal from the options, or connect from a process that principal's selectors match."),
			slog.LevelWarn, "claimed principal does not match the caller", "claim", claim, "matched", d.Matched, "identity", id.String())
		return
	}
	if !d.Allowed {
		req.Unauthorized = true
		req.Retrieval.Attempted = true
		hint := "Add a grant of this role on this upstream to one of the caller's principals"
		if len(d.Matched) == 0 {
			hint = "Define a principal whose selectors match this process, and grant it the role"
		} else {
			hint += " (" + strings.Join(d.Matched, ", ") + ")"
		}
		fail(refuse(CodeInvalidAuthorization, ReasonUnauthorized,
			fmt.Sprintf("no grant lets %s use role %q on upstream %q", id, role, dbname),
			hint+" in the pgward policy."),
			slog.LevelWarn, "unauthorized request: no grant", "matched", d.Matched, "identity", id.String())
		return
	}
	info.Principal = d.Principal
	log = log.With("principal", d.Principal, "sid", info.SessionID)

	// Concurrent sessions, per principal.
	release, lerr := s.limiter.acquire(d.Principal)
	if lerr != nil {
		fail(lerr, slog.LevelWarn, "throttled: too many sessions", "caller", principalKey(d.Principal).String(), "identity", id.String())
		return
	}
	defer release()

	// Credentials.
	req.Retrieval.Attempted = true
	fctx, fspan := s.tracer.Start(authCtx, "credentials.fetch")
	// A backend that hangs must not hold the login past listen.login_timeout.
	fctx, fcancel := context.WithDeadline(fctx, accepted.Add(st.cfg.Listen.loginTimeout()))
	t := time.Now()
	cred, err := fetchCredential(fctx, s.secrets, ups.cfg, dbname, role) // certauth.go
	fcancel()
	req.Durations[StageCredentials] = time.Since(t)
	fspan.End()
	if err != nil {
		fspan.SetStatus(codes.Error, "credential fetch failed")
		code := CodeCannotConnect
		if errors.Is(err, secrets.ErrDenied) || errors.Is(err, secrets.ErrNotFound) {
			code = CodeInvalidAuthorization
		}
		fail(refuse(code, ReasonBackendError,
			fmt.Sprintf("pgward could not get the credential for role %q on upstream %q from its secrets backend: %s", role, dbname, backendProblem(err)),
			"Check the secrets backend and that it holds this role's credential."),
			slog.LevelError, "credential fetch failed", "err", err)
		return
	}
	req.Retrieval.OK = true
	var sess *session
	if cred.Lease != nil && cred.Lease.Release != nil {
		defer func() {
			if sess == nil || !sess.leaseParked {
				cred.Lease.Release()
			}
		}()
	}

	// The upstream session's application_name carries the caller.
	clientApp := setAppName(params, ups.cfg.applicationName(), d.Principal, reqID)

	// Upstream authentication.
	uctx, uspan := s.tracer.Start(authCtx, "upstream.auth")
	uctx, cancel := context.WithTimeout(uctx, ups.cfg.connectTimeout())
	t = time.Now()
	up, reused, err := s.upstreamFor(uctx, ups, role, cred, params)
	cancel()
	req.Durations[StageUpstreamAuth] = time.Since(t)
	uspan.End()
	if err != nil {
		uspan.SetStatus(codes.Error, "upstream authentication failed")
		switch ce := clientErrorFor(err); {
		case ce != nil:
			fail(ce, slog.LevelInfo, "upstream refused the session the client asked for", "err", err)
		case certClientError(err, dbname, role) != nil:
			fail(certClientError(err, dbname, role), slog.LevelWarn, "upstream client-certificate authentication failed", "err", err)
		case errors.Is(err, errUpstreamRejected):
			fail(refuse(CodeInvalidPassword, ReasonUpstreamRejected,
				fmt.Sprintf("upstream %q rejected the credential pgward holds for role %q", dbname, role),
				"Check the secrets backend: the stored password may be wrong or expired."),
				slog.LevelError, "upstream rejected the stored credential", "err", err)
		case errors.Is(err, errAuthMethodRefused):
			fail(refuse(CodeCannotConnect, ReasonUpstreamRejected,
				fmt.Sprintf("upstream %q asked for an authentication method pgward does not allow for it", dbname),
				authMethodHint(dbname)),
				slog.LevelWarn, "upstream asked for a refused authentication method", "err", err)
		default:
			fail(refuse(CodeCannotConnect, ReasonBackendError,
				fmt.Sprintf("pgward could not connect to upstream %q", dbname),
				"Check that the upstream server is running and reachable from the pgward host."),
				slog.LevelError, "upstream connection failed", "err", err)
		}
		return
	}
	// What the credential's role can become: learned at its first use,
	// reported, and refused where the upstream says so (roles.go).
	rctx, rcancel := context.WithTimeout(authCtx, ups.cfg.connectTimeout())
	cerr := s.checkRoles(rctx, ups, role, cred, up, &info, log)
	rcancel()
	if cerr != nil {
		up.conn.Close()
		fail(cerr, slog.LevelWarn, "refused: the credential's role can become other roles (refuse_role_switching)", "identity", id.String())
		return
	}
	authSpan.End()

	sess = &session{
		srv: s, info: info, claim: claim, log: log, span: span, ctx: ctx,
		client: c, up: up, ups: ups, lease: cred.Lease, reused: reused, cred: cred,
		clientApp: clientApp, upApp: params["application_name"],
	}
	if !s.addSession(sess) {
		up.conn.Close()
		fail(refuse(CodeAdminShutdown, "", "pgward is shutting down", "Reconnect in a moment."), slog.LevelInfo, "refused: shutting down")
		return
	}
	defer s.removeSession(sess)

	sess.info.Success = true
	if err := s.obs.SessionStart(ctx, &sess.info); err != nil {
		up.conn.Close()
		req.Durations[StageTotal] = time.Since(accepted)
		s.obs.Auth(ctx, req)
		log.Error("audit log unavailable: refusing session", "err", err)
		sendError(c, refuse(CodeIOError, "", "pgward's audit log is unavailable, so no session can start", "Ask the operator to check pgward's audit log destination."))
		return
	}
	req.Durations[StageTotal] = time.Since(accepted)
	s.obs.Auth(ctx, req)

	sess.key = s.cancels.add(up.pid, sess)
	defer s.cancels.remove(sess.key)

	if err := sess.greet(); err != nil {
		up.conn.Close()
		sess.info.EndReason = "client_closed"
		sess.info.End = time.Now()
		s.obs.SessionEnd(ctx, &sess.info)
		return
	}
	_ = c.SetDeadline(time.Time{})
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
// both connections close.
func (sess *session) terminate(reason, code, msg string) {
	sess.termOnce.Do(func() {
		sess.termMu.Lock()
		sess.reason, sess.termCode, sess.termMsg = reason, code, msg
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

func (sess *session) termination() (reason, code, msg string) {
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
