package exporter

import (
	"context"
	"log/slog"
	"math"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"

	"github.com/pgward/pgward/broker"
)

// Observer implements broker.Observer: it is the one place a session's
// telemetry goes. Each call becomes metrics, an audit event, spans and, for
// a lifecycle event (session started, refused, ended; cancel request), one
// log line carrying the request_id (and sid, principal, pid, uid once
// known). Denials and malicious-looking activity are logged at WARN with
// the evidence.
//
// Per request Begin returns a request (spans of the stages, the refusal or
// the start); per session Started returns a session (its event counter,
// statements in flight, spans), so no call looks a session up.
//
// Fail-closed: Started (of a session) and Statements return the audit
// sink's error, so the broker refuses the session or stops forwarding.
type Observer struct {
	log    *slog.Logger
	m      *Metrics
	audit  *Audit // nil: no audit trail
	tracer trace.Tracer
	// refusals paces the audit events of refusals (aggregate.go).
	refusals *refusals
}

var _ broker.Observer = (*Observer)(nil)

// An ObserverOption tunes NewObserver.
type ObserverOption func(*Observer)

// WithTracerProvider makes the session traces with tp (default: a no-op
// provider, so the broker's own random ids are the request_ids).
func WithTracerProvider(tp trace.TracerProvider) ObserverOption {
	return func(o *Observer) {
		if tp != nil {
			o.tracer = tp.Tracer(tracerName)
		}
	}
}

// NewObserver returns an Observer writing to log, m and audit. m nil uses a
// private throwaway registry; audit nil writes no audit trail (and so never
// refuses anything).
func NewObserver(log *slog.Logger, m *Metrics, audit *Audit, opts ...ObserverOption) *Observer {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if m == nil {
		m = NewMetrics(prometheus.NewRegistry())
	}
	o := &Observer{log: log, m: m, audit: audit, tracer: noop.NewTracerProvider().Tracer(tracerName)}
	for _, opt := range opts {
		opt(o)
	}
	if audit != nil {
		o.refusals = newRefusals(audit, m, log)
	}
	return o
}

// session is one session's observer: it numbers the session's events (ei)
// and remembers each statement in flight, so db.session.query.result can
// point at its query and its span be ended.
type session struct {
	o    *Observer
	s    *broker.SessionInfo
	span trace.Span // pgward.session
	hdr  *sessionHeader

	mu      sync.Mutex
	ei      int64
	pending []pendingQuery
	ended   bool

	// The statements staged and not yet committed (StageStatements);
	// only the session's client pump touches these.
	staged  []*broker.QueryEvent
	audited bool // staged with an audit event or a span
	sq      stagedQueries
}

type pendingQuery struct {
	index, ei int64
	// password: the text mentions a password, so the server's error
	// message, which may quote part of it, is not audited.
	password bool
	span     trace.Span // nil when the trace is not sampled
}

var (
	_ broker.SessionObserver = (*session)(nil)
	_ broker.StatementStager = (*session)(nil)
)

// spanID is the id of a statement's span; zero without one.
func spanID(sp trace.Span) trace.SpanID {
	if sp == nil {
		return trace.SpanID{}
	}
	return sp.SpanContext().SpanID()
}

// next is the ei of the session's next event; 0 once it ended.
func (st *session) next() int64 {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.ended {
		return 0
	}
	st.ei++
	return st.ei
}

func sessionAttrs(s *broker.SessionInfo) []any {
	return []any{
		slog.String("request_id", s.RequestID),
		slog.String("sid", s.SessionID),
		slog.String("principal", s.Principal),
		slog.Int("pid", int(s.Identity.PID)),
		slog.Uint64("uid", uint64(s.Identity.UID)),
		slog.String("db_service", s.Upstream),
		slog.String("db_user", s.User),
	}
}

func identityAttr(id *broker.Identity) slog.Attr {
	attrs := []any{
		slog.Int("pid", int(id.PID)), slog.Uint64("uid", uint64(id.UID)), slog.Uint64("gid", uint64(id.GID)),
		slog.String("user", id.User), slog.String("exe", id.Exe), slog.String("comm", id.Comm),
		slog.String("cgroup", id.Cgroup), slog.Bool("attested", id.Attested),
	}
	if id.SystemdUnit != "" {
		attrs = append(attrs, slog.String("systemd_unit", id.SystemdUnit))
	}
	if id.ContainerID != "" {
		attrs = append(attrs, slog.String("container_id", id.ContainerID))
	}
	if id.Pod != nil {
		attrs = append(attrs, slog.String("pod", id.Pod.Namespace+"/"+id.Pod.Name))
	}
	return slog.Group("process", attrs...)
}

// countAuth counts an authentication request and its checks.
func (o *Observer) countAuth(r *broker.AuthRequest) {
	m := o.m
	m.requests.Inc()
	if r.Failure == "" {
		m.responses.Inc()
	} else {
		m.errorResponses.Inc()
		if c, ok := m.authFailures[r.Failure]; ok {
			c.Inc()
		} else {
			m.authFailuresOther.Inc()
		}
	}
	count := func(c broker.Check, attempts, failures prometheus.Counter) {
		if c.Attempted {
			attempts.Inc()
			if !c.OK {
				failures.Inc()
			}
		}
	}
	count(r.Verification, m.verifyAttempts, m.verifyFailures)
	count(r.Matching, m.matchAttempts, m.matchFailures)
	count(r.Retrieval, m.retrievalAttempts, m.retrievalFailures)
	if r.Unauthorized {
		if !r.Retrieval.Attempted {
			m.retrievalAttempts.Inc()
		}
		m.unauthorized.Inc()
	}
	for stage, d := range r.Durations {
		if h, ok := m.duration[stage]; ok && d > 0 {
			h.Observe(d.Seconds())
		}
	}
}

// refusalLevel is the level of a refusal's log line: WARN for what a
// caller did (the design's malicious-looking activity), ERROR for what
// needs the operator (a backend or the upstream failing, or rejecting the
// credential pgward holds), INFO for the server's answer about the session
// the client asked for and for a refusal that is no authentication failure
// (shutting down).
func refusalLevel(r *broker.AuthRequest, s *broker.SessionInfo) slog.Level {
	switch r.Failure {
	case "":
		return slog.LevelInfo
	case broker.ReasonBackendError:
		return slog.LevelError
	case broker.ReasonUpstreamRejected:
		code := ""
		if s != nil {
			code = s.Code
		}
		switch code {
		case broker.CodeInvalidPassword:
			return slog.LevelError
		case broker.CodeCannotConnect:
			return slog.LevelWarn
		}
		return slog.LevelInfo
	}
	return slog.LevelWarn
}

func checkString(c broker.Check) string {
	switch {
	case !c.Attempted:
		return "not_attempted"
	case c.OK:
		return "ok"
	}
	return "failed"
}

// Begin opens the request's trace: its pgward.session span, whose trace id
// becomes the request_id, and the pgward.auth span its stages hang from.
func (o *Observer) Begin(ctx context.Context, r *broker.Request) (context.Context, broker.RequestObserver) {
	ctx, span, auth := startRequestSpans(ctx, o.tracer, r)
	return ctx, &request{o: o, span: span, auth: auth}
}

// request is one authentication request's observer.
type request struct {
	o          *Observer
	span, auth trace.Span // pgward.session, pgward.auth
}

var _ broker.RequestObserver = (*request)(nil)

// StageStart opens the stage's span under pgward.auth.
func (r *request) StageStart(ctx context.Context, st broker.Stage) context.Context {
	return startStageSpan(ctx, r.o.tracer, r.auth, st)
}

// StageEnd ends the stage's span, marking a failure.
func (r *request) StageEnd(ctx context.Context, st broker.Stage, err error) {
	endStageSpan(ctx, st, err)
}

// Refused audits a refusal (paced per caller, aggregate.go), counts it and
// logs it once, with the evidence.
func (r *request) Refused(ctx context.Context, ar *broker.AuthRequest, s *broker.SessionInfo) {
	o := r.o
	if s != nil && o.audit != nil && (o.refusals == nil || o.refusals.full(time.Now(), sessionRefusal(s))) {
		// Within the caller's allowance; beyond it the refusal is counted in
		// a db.refusal.summary instead.
		_ = o.audit.sessionStart(time.Now(), s, 1)
	}
	o.countAuth(ar)
	msg := "authentication refused"
	if ar.Failure == "" {
		msg = "session refused"
	}
	attrs := []any{"request_id", ar.RequestID, "reason", string(ar.Failure), "cause", ar.Cause}
	if ar.Err != nil {
		attrs = append(attrs, "err", ar.Err.Error())
	}
	if s != nil {
		attrs = append(attrs, "sqlstate", s.Code, "error", s.Error, "sid", s.SessionID)
	}
	attrs = append(attrs, "verification", checkString(ar.Verification), "matching", checkString(ar.Matching),
		"retrieval", checkString(ar.Retrieval), "unauthorized", ar.Unauthorized)
	// The evidence: who asked for what.
	if ar.Upstream != "" || ar.Role != "" {
		attrs = append(attrs, "db_service", ar.Upstream, "db_user", ar.Role)
	}
	if ar.ClaimedPrincipal != "" {
		attrs = append(attrs, "claimed_principal", ar.ClaimedPrincipal)
	}
	if len(ar.Matched) > 0 {
		attrs = append(attrs, "matched", ar.Matched)
	}
	if ar.Verification.OK {
		attrs = append(attrs, identityAttr(&ar.Identity))
	}
	o.log.Log(ctx, refusalLevel(ar, s), msg, attrs...)
	code := ""
	if s != nil {
		code = s.Code
	}
	endRequestSpans(r.span, r.auth, code)
}

// Started audits a session's start; an audit failure is returned and the
// broker refuses the session (58030).
func (r *request) Started(ctx context.Context, ar *broker.AuthRequest, s *broker.SessionInfo) (broker.SessionObserver, error) {
	o := r.o
	st := &session{o: o, s: s, span: r.span, ei: 1}
	if o.audit != nil {
		if err := o.audit.sessionStart(time.Now(), s, 1); err != nil {
			o.countAuth(ar)
			o.log.ErrorContext(ctx, "session refused: audit trail unavailable", append(sessionAttrs(s), "error", err)...)
			endRequestSpans(r.span, r.auth, broker.CodeIOError)
			return nil, err
		}
		st.hdr = newSessionHeader(s)
	}
	o.countAuth(ar)
	o.m.sessionsActive.Inc()
	o.m.sessionsTotal.Inc()
	o.log.InfoContext(ctx, "session started", append(sessionAttrs(s),
		"db_name", s.Database, "application_name", s.ApplicationName,
		"duration", ar.Durations[broker.StageTotal], identityAttr(&s.Identity))...)
	r.auth.End()
	return st, nil
}

// Statements audits the statements of one client read before they are
// forwarded, with one write to the audit file: all are durable before any
// is forwarded, and an error means none may be.
func (st *session) Statements(ctx context.Context, qs []*broker.QueryEvent) error {
	st.StageStatements(ctx, qs)
	return st.CommitStatements(ctx)
}

// StageStatements is Statements' first half (broker.StatementStager): the
// events are encoded, chained and staged for the audit file's next write,
// which CommitStatements waits for. qs stays the caller's until then.
func (st *session) StageStatements(ctx context.Context, qs []*broker.QueryEvent) {
	o, s := st.o, st.s
	st.staged = qs
	recording := st.span.IsRecording()
	st.audited = len(qs) > 0 && (o.audit != nil || recording)
	if !st.audited {
		return
	}
	// The span id of each statement goes into its audit event (span_id).
	var small [8]trace.SpanID
	var spans []trace.SpanID
	if recording {
		spans = small[:0]
	}
	st.mu.Lock()
	first := st.ei + 1
	for _, q := range qs {
		st.ei++
		p := pendingQuery{index: q.Index, ei: st.ei, password: mentionsPassword(q.Text)}
		if recording {
			p.span = startStatementSpan(ctx, o.tracer, s, q)
			spans = append(spans, spanID(p.span))
		}
		st.pending = append(st.pending, p)
	}
	st.mu.Unlock()
	if o.audit != nil {
		o.audit.stageQueries(&st.sq, time.Now(), st.hdr, s, qs, first, spans)
	}
}

// CommitStatements returns once the statements staged are durable (nil:
// they may be forwarded); an error means none may be.
func (st *session) CommitStatements(ctx context.Context) error {
	o, s, qs := st.o, st.s, st.staged
	st.staged = nil
	if st.audited && o.audit != nil {
		if err := o.audit.waitQueries(&st.sq); err != nil {
			st.mu.Lock()
			n := max(0, len(st.pending)-len(qs))
			for _, p := range st.pending[n:] {
				endStatementSpan(p.span, broker.CodeIOError)
			}
			st.pending = st.pending[:n]
			st.mu.Unlock()
			o.log.ErrorContext(ctx, "statement not forwarded: audit trail unavailable; ending the session",
				append(sessionAttrs(s), "query_index", qs[0].Index, "statements", len(qs), "error", err)...)
			return err
		}
	}
	o.m.queries.Add(float64(len(qs)))
	if st.audited && o.log.Enabled(ctx, slog.LevelDebug) {
		for _, q := range qs {
			o.log.DebugContext(ctx, "statement", append(sessionAttrs(s), "query_index", q.Index, "extended", q.Extended)...)
		}
	}
	return nil
}

// Result audits a statement's outcome and ends its span.
func (st *session) Result(ctx context.Context, q *broker.QueryEvent) {
	o, s := st.o, st.s
	st.mu.Lock()
	st.ei++
	ei := st.ei
	var p pendingQuery
	for i := range st.pending {
		if st.pending[i].index == q.Index {
			p = st.pending[i]
			st.pending = append(st.pending[:i], st.pending[i+1:]...)
			break
		}
	}
	st.mu.Unlock()
	if o.audit != nil {
		// The statement already ran; a failure here is counted and logged by the sink.
		_ = o.audit.queryResult(time.Now(), st.hdr, s, q, ei, p.ei, spanID(p.span), p.password)
	}
	if p.span != nil {
		code := ""
		if !q.Success {
			code = q.Code
		}
		endStatementSpan(p.span, code)
	}
	if o.log.Enabled(ctx, slog.LevelDebug) {
		o.log.DebugContext(ctx, "statement done", append(sessionAttrs(s), "query_index", q.Index,
			"success", q.Success, "sqlstate", q.Code, "rows", q.Rows, "duration", q.Duration)...)
	}
}

// Bytes counts relayed bytes.
func (st *session) Bytes(toUpstream bool, n int) {
	if toUpstream {
		st.o.m.relayToUpstream.Add(float64(n))
	} else {
		st.o.m.relayToClient.Add(float64(n))
	}
}

// Cancel is a CancelRequest whose key named this session.
func (st *session) Cancel(ctx context.Context, c *broker.CancelEvent) {
	st.o.cancel(ctx, c, st.next)
}

// End audits the end of the session, logs it once and ends its trace.
func (st *session) End(ctx context.Context) {
	o, s := st.o, st.s
	o.m.sessionsActive.Dec()
	st.mu.Lock()
	st.ei++
	ei := st.ei
	st.ended = true
	st.mu.Unlock()
	if o.audit != nil {
		_ = o.audit.sessionEnd(time.Now(), s, ei)
	}
	// WARN for an end an operator should look at, and for one pgward
	// forced (revoked grant, lease, operator, malformed or oversized
	// message): then cause says what it saw.
	level := slog.LevelInfo
	if s.EndReason.Failed() || s.EndCause != "" {
		level = slog.LevelWarn
	}
	end := s.End
	if end.IsZero() {
		end = time.Now()
	}
	attrs := append(sessionAttrs(s), "reason", string(s.EndReason), "error", s.Error)
	if s.EndCause != "" {
		attrs = append(attrs, "cause", s.EndCause)
	}
	o.log.Log(ctx, level, "session ended", append(attrs,
		"duration", end.Sub(s.Start), "queries", s.Queries, "bytes_in", s.BytesIn, "bytes_out", s.BytesOut)...)
	endSessionSpan(st.span, s.EndReason)
}

// CredentialRoles sets pgward_credential_switchable_roles for a credential
// at its first use (the broker logs the WARN).
func (o *Observer) CredentialRoles(upstream, role string, m broker.RoleMemberships) {
	v := float64(len(m.Roles))
	if m.Superuser {
		v = math.Inf(1)
	}
	o.m.switchableRoles.WithLabelValues(upstream, role).Set(v)
}

// Cancel is a CancelRequest whose key named no session.
func (o *Observer) Cancel(ctx context.Context, c *broker.CancelEvent) {
	o.cancel(ctx, c, nil)
}

// cancel counts, audits and logs a CancelRequest once; one that was not
// forwarded (forged or stale key, a caller other than the session's) is
// logged at WARN. ei numbers the event in its session (nil: none).
func (o *Observer) cancel(ctx context.Context, c *broker.CancelEvent, ei func() int64) {
	if c.Forwarded {
		o.m.cancelForwarded.Inc()
	} else {
		o.m.cancelRejected.Inc()
	}
	audit := o.audit != nil
	if !c.Forwarded && o.refusals != nil && !o.refusals.full(time.Now(), cancelRefusal(c)) {
		audit = false // beyond the caller's allowance: counted in a db.refusal.summary
	}
	if audit {
		var n int64
		if ei != nil {
			n = ei()
		}
		_ = o.audit.cancel(time.Now(), c, n)
	}
	attrs := []any{"request_id", c.RequestID, identityAttr(&c.Caller)}
	if c.Session != nil {
		attrs = append(attrs, "target_sid", c.Session.SessionID, "target_request_id", c.Session.RequestID,
			"target_pid", c.Session.Identity.PID, "target_uid", c.Session.Identity.UID)
	}
	if c.BackendPID != 0 {
		attrs = append(attrs, "backend_pid", c.BackendPID)
	}
	if c.Forwarded {
		o.log.InfoContext(ctx, "cancel request forwarded", attrs...)
		return
	}
	attrs = append(attrs, "reason", c.Reason, "cause", c.Cause)
	if c.Err != nil {
		attrs = append(attrs, "err", c.Err.Error())
	}
	o.log.WarnContext(ctx, "cancel request rejected", attrs...)
}

// DirectConnect records a connect that went around pgward (from the agent's
// eBPF tracker): counter, audit event db.connect.direct, WARN log. The error
// is the audit sink's; the connect has happened (or was blocked) regardless.
func (o *Observer) DirectConnect(ctx context.Context, e DirectConnectEvent) error {
	if e.Blocked {
		o.m.directBlocked.Inc()
	} else {
		o.m.directAllowed.Inc()
	}
	var err error
	if o.audit != nil {
		err = o.audit.directConnect(time.Now(), &e)
	}
	o.log.WarnContext(ctx, "direct connect to a guarded database endpoint", "dest", e.Dest,
		"db_service", e.Upstream, "blocked", e.Blocked, identityAttr(&e.Process))
	return err
}
