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

// AuthRequest describes one authentication request (one client connection
// that sent a StartupMessage) once its outcome is known. It is handed to
// Observer.Auth exactly once per request, success or failure.
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
	// Failure is empty on success.
	Failure FailureReason
	// Durations per stage; zero when the stage did not run.
	Durations map[Stage]time.Duration
}

// SessionInfo is what an audit event says about a session. The broker owns it
// and never changes a field after handing it to an Observer, except through the
// documented Observer calls that follow (End fields at SessionEnd).
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

	// Set on denial (SessionStart with Success false) or on error end.
	Success bool
	Code    string // SQLSTATE sent to the client, when refused
	Error   string // the message sent to the client, when refused
	// Refusal is why a start was refused (the auth_failures_total reason);
	// empty for a refusal that is no authentication failure (shutdown).
	Refusal FailureReason

	// Set at SessionEnd.
	End       time.Time
	EndReason string // "client_closed", "upstream_closed", "terminated", "lease_expired", "shutdown", "audit_unavailable", "error"
	BytesIn   int64  // client → upstream
	BytesOut  int64  // upstream → client
	Queries   int64

	// ObserverState belongs to the Observer: it may set it in SessionStart
	// (before the relay starts) and read it in the session's later calls,
	// to keep what it needs per session without a lookup of its own. The
	// broker never reads or writes it.
	ObserverState any
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
// Text or Params) after the Query or QueryDone call returns.
type QueryEvent struct {
	Index     int64  // 1-based index of this statement in the session
	Text      string // statement text; only valid during the Observer.Query call
	Statement string // prepared statement name ("" = unnamed); extended protocol only
	Portal    string
	Extended  bool
	// BindOnly: a Bind audited on its own, with no Execute read with it.
	BindOnly bool
	// FunctionOID is the function a FunctionCall runs (Params are its
	// arguments); 0 otherwise.
	FunctionOID uint32
	Params      []Param // only valid during the Observer.Query call

	// RoleChange: the text changes the role statements run as (SET ROLE,
	// SET SESSION AUTHORIZATION, set_config('role', …), RESET…, DISCARD
	// ALL), read lexically; see rolesql.go for what it cannot see.
	RoleChange bool

	Start time.Time
	// Filled for QueryDone.
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
	// Session is the cancelled session when the key matched.
	Session *SessionInfo
}

// Observer receives what the broker does: the exporter turns it into audit
// events, metrics, and log lines. Implementations must be safe for concurrent
// use and must not keep Param values after the call returns.
//
// Calls that return an error are on the fail-closed path: when SessionStart
// or Query returns an error, the broker refuses the session (58030) or stops
// forwarding the session's statements, because the audit trail could not
// record them.
type Observer interface {
	// Auth is called once per authentication request with its outcome.
	Auth(ctx context.Context, r *AuthRequest)
	// SessionStart is called when a session was authorized and authenticated
	// upstream (Success true), or refused after its startup message was read
	// (Success false, with Code and Error). An error on a successful start
	// refuses the session.
	SessionStart(ctx context.Context, s *SessionInfo) error
	// Query is called before the statement is forwarded upstream. An error
	// stops forwarding: the session is ended with 58030.
	Query(ctx context.Context, s *SessionInfo, q *QueryEvent) error
	// QueryDone is called when the statement completed (CommandComplete,
	// ErrorResponse, EmptyQueryResponse or PortalSuspended).
	QueryDone(ctx context.Context, s *SessionInfo, q *QueryEvent)
	// SessionEnd is called once for every session that SessionStart accepted.
	SessionEnd(ctx context.Context, s *SessionInfo)
	// Cancel is called for every CancelRequest.
	Cancel(ctx context.Context, c *CancelEvent)
	// RelayBytes counts relayed bytes; toUpstream is the direction.
	RelayBytes(toUpstream bool, n int)
}

// NopObserver observes nothing.
type NopObserver struct{}

func (NopObserver) Auth(context.Context, *AuthRequest)                     {}
func (NopObserver) SessionStart(context.Context, *SessionInfo) error       { return nil }
func (NopObserver) Query(context.Context, *SessionInfo, *QueryEvent) error { return nil }
func (NopObserver) QueryDone(context.Context, *SessionInfo, *QueryEvent)   {}
func (NopObserver) SessionEnd(context.Context, *SessionInfo)               {}
func (NopObserver) Cancel(context.Context, *CancelEvent)                   {}
func (NopObserver) RelayBytes(bool, int)                                   {}
