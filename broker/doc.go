// Package broker is the Postgres side of pgward: the listener on the node
// socket, the session state machine (startup, identity, policy, credentials,
// upstream authentication, greeting, relay, cancel), and the interfaces it
// consumes: IdentityResolver (who is calling), secrets.Source (the real
// credential) and Observer (audit, metrics, traces, lifecycle logs).
//
// For operators (sessions.go): Sessions lists the live sessions with their
// state as the server's ReadyForQuery says it, EndSession ends one like a
// revoked grant (endsession.go), Parked lists the reuse pool.
//
// Lifecycle: New validates the Config; Serve(ctx, ln) accepts until ctx ends
// or Close is called; Shutdown stops accepting and drains sessions with a limit.
//
// # The seam
//
// What a session does is reported once, to the Observer (observer.go), in
// the shape of pgx's tracers: Observer.Begin opens a request and returns its
// context and a RequestObserver (StageStart/StageEnd around identity,
// credentials and upstream authentication, then Refused or Started with the
// AuthRequest); Started returns a SessionObserver (Statements before they
// are forwarded, Result, Bytes, Cancel, End). The broker itself logs no
// lifecycle event and makes no span; its logger gets operational lines only
// (a malformed message, a lease that ended, a reload that revoked a grant).
// Fail-closed: a Started error refuses the session (58030); a Statements
// error stops forwarding and ends the session.
//
// # Layout
//
//	server.go      Server, Options, New, Serve, Shutdown, Close, Reload; the session registry
//	sessions.go    the live sessions for operators: Sessions, EndSession (the admin socket's)
//	session.go     one connection: handle (startup packet, cancel or login), startSession
//	               (the data path over the steps of login.go), startup-parameter filtering, greet
//	login.go       the steps of a login: beginLogin, verifyIdentity, authorize, admitSession,
//	               fetchCredential, authenticateUpstream, openSession, started; refuse
//	observer.go    the seam: Observer, RequestObserver, SessionObserver and their data
//	               (Request, AuthRequest, SessionInfo, QueryEvent, CancelEvent, EndReason)
//	relay.go       the relay: two pumps that move whole buffers, frame by frame, and end the session
//	frames.go      frameScanner: frame headers, the messages to inspect, size limits
//	statements.go  the statement tracker (Parse/Bind/Execute/Close decoded by hand, moved on
//	               the server's answers), command tags, statements reported to the SessionObserver
//	sqleffects.go  what a simple Query's SQL does to prepared statements and portals
//	rolesql.go     the lexical reading of statements that change the role
//	roles.go       what a credential's role can become (learned at first use), role changes
//	reuse.go       upstream connection reuse: the pool, a session's part in it, park or close
//	upstream.go    upstreams: dial, TLS, authentication, pgward's own queries on a connection
//	scram.go       the SCRAM-SHA-256(-PLUS) client and its cache of derived keys
//	endsession.go  ending a session from outside: cancel the running statement, then terminate
//	cancel.go      CancelRequest: pgward's keys, the checks, forwarding
//	slots.go       connection slots per uid and cgroup (53300 before any authentication)
//	limits.go      throttling of authentication requests and sessions per principal
//	relayreader.go the relay's reader: pooled buffers, growing for large messages
//	budget.go      limits.buffer_memory, shared by every session's relay
//	policy.go      principals and grants: Authorize
//	identity.go    Identity and the IdentityResolver interface
//	startup.go     startup packets: SSLRequest, GSSENCRequest, CancelRequest, StartupMessage
//	appname.go     the upstream session's application_name format
//	errors.go      SQLSTATEs, ClientError, the server's ErrorResponse fields
//	config.go      Config and its validation
//	configkeys.go  the table of broker config keys (defaults, choices, docs)
//
// It deliberately does not import any package of pgward's, Prometheus,
// OpenTelemetry or cilium/ebpf (cmd/pgward's TestImportDirections): the
// agent wires those in through the interfaces above. It never decodes and
// re-encodes relayed messages: it reads frame headers and looks at the few
// messages audit needs.
package broker
