package broker

import (
	"context"
	"time"
)

// Stage names a step of an authentication request, for latency histograms.
type Stage string

// The stages of an authentication request (metric label values).
const (
	StageTotal        Stage = "total"
	StageIdentity     Stage = "identity"
	StageCredentials  Stage = "credentials"
	StageUpstreamAuth Stage = "upstream_auth"
)

// FailureReason says why an authentication request was refused (metric label values).
type FailureReason string

// The bounded set of failure reasons.
const (
	ReasonIdentity         FailureReason = "identity"
	ReasonUnauthorized     FailureReason = "unauthorized"
	ReasonThrottled        FailureReason = "throttled"
	ReasonBackendError     FailureReason = "backend_error"
	ReasonUpstreamRejected FailureReason = "upstream_rejected"
	ReasonProtocol         FailureReason = "protocol"
)

// Check is the outcome of one security check of a request. Attempted is false
// when the request never got that far.
type Check struct {
	Attempted bool
	OK        bool
}

// AuthRequest is the outcome of one authentication request (one client
// connection that sent a StartupMessage): the data a RequestObserver is
// handed once, at Refused or Started.
type AuthRequest struct {
	RequestID string
	// The evidence: who asked (zero when identity failed before it was
	// known), for what, and the principal claimed in the startup options.
	Identity         Identity
	Upstream         string
	Role             string
	ClaimedPrincipal string
	// Verification: proving who the caller is (peer credentials, eBPF record, /proc).
	Verification Check
	// Matching: the claimed principal against the kernel identity. Attempted
	// only when the client claimed a principal.
	Matching Check
	// Retrieval: fetching the secret. Unauthorized is set when the caller asked
	// for a role it holds no grant for, so no fetch was made.
	Retrieval    Check
	Unauthorized bool
	// Failure is empty on success (and for a refusal that is no
	// authentication failure: shutting down).
	Failure FailureReason
	// Cause says, for the operator, what the broker saw when it refused
	// ("no grant", "credential fetch failed"); Err is the underlying error
	// (a backend's or the upstream's), never sent to the client; Matched
	// are the principals the caller's identity matched, for policy
	// refusals. All empty on success.
	Cause   string
	Err     error
	Matched []string
	// Durations per stage; zero when the stage did not run.
	Durations map[Stage]time.Duration
}

// EndReason says why a session ended (the reason field of db.session.end).
type EndReason string

// The reasons a session ends.
const (
	EndClientClosed     EndReason = "client_closed"     // the client sent Terminate or closed
	EndUpstreamClosed   EndReason = "upstream_closed"   // the server closed the connection
	EndError            EndReason = "error"             // reading the client failed
	EndShutdown         EndReason = "shutdown"          // pgward drained (Shutdown, Close)
	EndGrantRevoked     EndReason = "grant_revoked"     // a reload took the grant away
	EndLeaseExpired     EndReason = "lease_expired"     // the credential's lease reached its end
	EndLeaseRevoked     EndReason = "lease_revoked"     // the credential's lease was revoked
	EndByOperator       EndReason = "ended_by_operator" // pgward sessions end (EndSession)
	EndAuditUnavailable EndReason = "audit_unavailable" // a statement could not be audited
	EndMessageTooLarge  EndReason = "message_too_large" // a message over limits.max_message_bytes
	EndProtocolError    EndReason = "protocol_error"    // a malformed message
)

// Failed reports whether the end is one an operator should look at.
func (r EndReason) Failed() bool { return r == EndError || r == EndAuditUnavailable }

// SessionInfo is what an audit event says about a session. The broker owns it
// and never changes a field after handing it to an Observer, except the End
// fields, set before SessionObserver.End.
type SessionInfo struct {
	RequestID string // W3C trace id of the session's trace, hex
	SessionID string // uuid of the session
	Protocol  string // "postgres"

	Upstream  string // db_service: the upstream's name in the config (the client's dbname)
	Database  string // db_name: the real database name upstream
	URI       string // db_uri: the upstream's address
	User      string // db_user: the role
	Principal string
	// ClaimedPrincipal is what the client claimed (options -c pgward.principal), if anything.
	ClaimedPrincipal string

	Identity Identity
	// Parameters are the startup parameters forwarded upstream (allowlisted).
	ApplicationName string

	Start time.Time

	// RoleMemberships is what the login role can become (SET ROLE within
	// its memberships; any role as a superuser), learned at the
	// credential's first use (roles.go); nil when unknown.
	RoleMemberships *RoleMemberships

	// Set on refusal (Refused) or on error end.
	Success bool
	Code    string // SQLSTATE sent to the client, when refused
	Error   string // the message sent to the client, when refused
	// Refusal is why a start was refused (the auth_failures_total reason);
	// empty for a refusal that is no authentication failure (shutdown).
	Refusal FailureReason

	// Set before SessionObserver.End.
	End       time.Time
	EndReason EndReason
	// EndCause says, for the operator, what made pgward end the session
	// ("grant revoked by reload", an operator's reason, the malformed
	// message's error); empty when the client or the server ended it. It
	// goes in the one "session ended" log line, never to the client.
	EndCause string
	BytesIn  int64 // client → upstream
	BytesOut int64 // upstream → client
	Queries  int64
}

// Param is one bound parameter of an Execute, as sent by the client.
type Param struct {
	OID    uint32 // from Parse's parameter types; 0 when the client left it to the server
	Format int16  // 0 text, 1 binary
	Value  []byte // nil is SQL NULL; only valid during the Observer call
}

// QueryEvent is one statement the client ran: a simple Query, one Execute of
// the extended protocol with the text of the statement its portal was bound
// to, a Bind with no Execute read with it (BindOnly: planning with the bound
// values can run functions), or a FunctionCall. Statement texts and names are
// those the server has, as its answers showed (see broker/statements.go).
//
// The broker recycles QueryEvents: an Observer must not keep one (or its
// Text or Params) after the Statements or Result call returns.
type QueryEvent struct {
	Index     int64  // 1-based index of this statement in the session
	Text      string // statement text; only valid during the Statements call
	Statement string // prepared statement name ("" = unnamed); extended protocol only
	Portal    string
	Extended  bool
	// BindOnly: a Bind audited on its own, with no Execute read with it.
	BindOnly bool
	// PortalUnverified: an Execute of a portal after other statements ran
	// since its Bind. Code they ran inside the server may have closed the
	// portal and opened a cursor of the same name (PL/pgSQL OPEN of a
	// refcursor), so Text is what was bound, not proven to be what ran.
	PortalUnverified bool
	// FunctionOID is the function a FunctionCall runs (Params are its
	// arguments); 0 otherwise.
	FunctionOID uint32
	Params      []Param // only valid during the Statements call

	// RoleChange: the text changes the role statements run as (SET ROLE,
	// SET SESSION AUTHORIZATION, set_config('role', …), RESET…, DISCARD
	// ALL), read lexically; see rolesql.go for what it cannot see.
	RoleChange bool

	Start time.Time
	// Filled for Result, by the goroutine reading the server's answers: a
	// Statements call must not read them (they may be written while it
	// runs, e.g. by an ErrorResponse the server sends unasked).
	Duration time.Duration
	Rows     int64  // from CommandComplete, -1 when unknown
	Tag      string // command tag, e.g. "SELECT 3"
	Success  bool
	Code     string // SQLSTATE on error
	Error    string // server's message on error (query errors are the user's own, safe to audit)

	// ServerRole is what the server reported (ParameterStatus) of
	// session_authorization and is_superuser when they changed, as
	// "name=value" joined with ", "; on the result of the last statement
	// the server answered with or before the report.
	ServerRole string
}

// CancelEvent describes one CancelRequest.
type CancelEvent struct {
	RequestID string
	Caller    Identity // who sent the CancelRequest
	// Forwarded is the decision to forward, audited before the cancel is
	// sent (a failure to reach the server after that is logged at ERROR).
	Forwarded bool
	// Reason a cancel was not forwarded: "unknown_key", "uid_mismatch",
	// "identity", "throttled" (too many wrong keys from this uid).
	Reason string
	// Cause says, for the operator, what the broker saw ("a key of the
	// wrong length"); Err is the identity error of an unverifiable caller.
	Cause string
	Err   error
	// BackendPID is the backend the key named.
	BackendPID uint32
	// Session is the cancelled session when the key matched (the event
	// then goes to that session's SessionObserver).
	Session *SessionInfo
}

// Request is what the broker knows of an authentication request when it
// begins: its id and when the connection was accepted.
type Request struct {
	// RequestID is an id the broker minted (16 random bytes, hex, the
	// shape of a W3C trace id). Begin may replace it with the trace id of
	// the request's trace, so that one key finds the log lines, the audit
	// events and the trace; the broker uses what Begin leaves.
	RequestID string
	Start     time.Time
}

// Observer receives what the broker does; the exporter turns it into audit
// events, metrics, spans and log lines. The broker itself logs no
// lifecycle event (start, refusal, end, cancel): it reports each once,
// here. The shape follows pgx's tracers: a call that begins something
// returns the context and the object its later calls go to, and an end
// takes a data struct.
//
// Implementations must be safe for concurrent use, must not keep a
// QueryEvent (or its Text or Params) after the call it was handed to
// returns, and must not keep Param values.
//
// Fail-closed: an error from RequestObserver.Started refuses the session
// (58030); an error from SessionObserver.Statements stops forwarding and
// ends the session: the audit trail could not record them.
type Observer interface {
	// Begin is called when a connection sent its startup packet (a
	// StartupMessage, or one that is malformed). The context it returns
	// is the request's (and the session's): the broker passes it to every
	// later call and to what it does for the request (credential fetch,
	// upstream dial).
	Begin(ctx context.Context, r *Request) (context.Context, RequestObserver)
	// Cancel is called for a CancelRequest whose key named no session (or
	// that was refused before its key was looked at).
	Cancel(ctx context.Context, c *CancelEvent)
	// SlotRefused is called for every connection refused for want of a
	// connection slot (53300), before any authentication.
	SlotRefused(ctx context.Context, r *SlotRefusal)
	// CredentialRoles is called once per credential (upstream, role,
	// credential version), when it is first used, with what its role can
	// become.
	CredentialRoles(upstream, role string, m RoleMemberships)
}

// RequestObserver follows one authentication request. Refused or Started
// ends it, exactly once — or neither, when the client vanished before
// anything could be answered (a failed write of NegotiateProtocolVersion):
// an implementation holds nothing that must be released.
type RequestObserver interface {
	// StageStart and StageEnd bracket a stage of the request (identity,
	// credentials, upstream_auth); err is the stage's failure, if any (an
	// implementation records that it failed, never the error's text, which
	// may come from a secrets backend). The context StageStart returns is
	// the stage's.
	StageStart(ctx context.Context, s Stage) context.Context
	StageEnd(ctx context.Context, s Stage, err error)
	// Refused ends a request that gets no session: r says why, s is the
	// session as far as it was known (nil for a startup packet that could
	// not be read).
	Refused(ctx context.Context, r *AuthRequest, s *SessionInfo)
	// Started ends a request whose session was authorized and
	// authenticated upstream, before the client is greeted. An error
	// refuses the session (58030): its start could not be audited. The
	// returned SessionObserver gets the session's later calls; s stays
	// valid (and unchanged, but for its End fields) until End.
	Started(ctx context.Context, r *AuthRequest, s *SessionInfo) (SessionObserver, error)
}

// SessionObserver follows one session, from Started to End.
type SessionObserver interface {
	// Statements is called before the statements of one client read are
	// forwarded upstream, in order; all must be durable when it returns
	// nil, and an error means none may be forwarded (the session is ended
	// with 58030).
	Statements(ctx context.Context, qs []*QueryEvent) error
	// Result is called when a statement completed (CommandComplete,
	// ErrorResponse, EmptyQueryResponse or PortalSuspended), was skipped,
	// or the session ended before it did.
	Result(ctx context.Context, q *QueryEvent)
	// Bytes counts relayed bytes; toUpstream is the direction. It is
	// called from the relay's pumps and must not block.
	Bytes(toUpstream bool, n int)
	// Cancel is called for a CancelRequest whose key named this session
	// (forwarded, or refused for another uid's caller).
	Cancel(ctx context.Context, c *CancelEvent)
	// End is called once, when the session ended; the End fields of the
	// SessionInfo are set.
	End(ctx context.Context)
}

// StatementStager is a SessionObserver that can split Statements in two,
// for the event loop (listen.event_loop): StageStatements takes the
// statements of one client read and returns without waiting for their
// audit to be durable; CommitStatements waits for it, and returns what
// Statements would have (an error: none may be forwarded). The loop stages
// the reads of one epoll round and then commits them, so one audit write
// serves them all. A session has at most one stage outstanding, and
// every stage is committed; qs stays valid until the commit returns.
type StatementStager interface {
	StageStatements(ctx context.Context, qs []*QueryEvent)
	CommitStatements(ctx context.Context) error
}

// NopObserver observes nothing.
type NopObserver struct{}

func (NopObserver) Begin(ctx context.Context, _ *Request) (context.Context, RequestObserver) {
	return ctx, NopObserver{}
}
func (NopObserver) Cancel(context.Context, *CancelEvent)                    {}
func (NopObserver) SlotRefused(context.Context, *SlotRefusal)               {}
func (NopObserver) CredentialRoles(string, string, RoleMemberships)         {}
func (NopObserver) StageStart(ctx context.Context, _ Stage) context.Context { return ctx }
func (NopObserver) StageEnd(context.Context, Stage, error)                  {}
func (NopObserver) Refused(context.Context, *AuthRequest, *SessionInfo)     {}
func (NopObserver) Started(context.Context, *AuthRequest, *SessionInfo) (SessionObserver, error) {
	return NopObserver{}, nil
}
func (NopObserver) Statements(context.Context, []*QueryEvent) error { return nil }
func (NopObserver) Result(context.Context, *QueryEvent)             {}
func (NopObserver) Bytes(bool, int)                                 {}
func (NopObserver) End(context.Context)                             {}

var (
	_ Observer        = NopObserver{}
	_ RequestObserver = NopObserver{}
	_ SessionObserver = NopObserver{}
)
