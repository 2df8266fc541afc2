package exporter

import (
	"context"
	"log/slog"
	"math"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/pgward/pgward/broker"
)

// Observer implements broker.Observer: each call becomes metrics, an audit
// event and, where an operator should see it, a log line carrying the
// request_id (and sid, principal, pid, uid once known). Denials and
// malicious-looking activity are logged at WARN with the evidence.
//
// Fail-closed: SessionStart (of a successful session) and Query return the
// audit sink's error, so the broker refuses the session or stops forwarding.
type Observer struct {
	log   *slog.Logger
	m     *Metrics
	audit *Audit // nil: no audit trail
	// refusals paces the audit events of refusals (aggregate.go).
	refusals *refusals

	mu       sync.Mutex
	sessions map[string]*sessionState // by SessionInfo.SessionID
}

// sessionState numbers a session's events (ei) and remembers the ei of each
// statement in flight, so db.session.query.result can point at its query.
type sessionState struct {
	mu      sync.Mutex
	ei      int64
	pending []pendingQuery
	hdr     *sessionHeader // set before the relay starts; read-only after
}

type pendingQuery struct {
	index, ei int64
	// password: the text mentions a password, so the server's error
	// message, which may quote part of it, is not audited.
	password bool
}

var _ broker.Observer = (*Observer)(nil)

// NewObserver returns an Observer writing to log, m and audit. m nil uses a
// private throwaway registry; audit nil writes no audit trail (and so never
// refuses anything).
func NewObserver(log *slog.Logger, m *Metrics, audit *Audit) *Observer {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if m == nil {
		m = NewMetrics(prometheus.NewRegistry())
	}
	o := &Observer{log: log, m: m, audit: audit, sessions: make(map[string]*sessionState)}
	if audit != nil {
		o.refusals = newRefusals(audit, m, log)
	}
	return o
}

// state returns the session's event counter, creating it when missing (a
// session whose start this Observer did not see).
func (o *Observer) state(sid string) *sessionState {
	o.mu.Lock()
	st := o.sessions[sid]
	if st == nil {
		st = &sessionState{}
		o.sessions[sid] = st
	}
	o.mu.Unlock()
	return st
}

// stateOf is the state of a session SessionStart accepted, kept on the
// SessionInfo so that statements take no lock shared by all sessions.
func (o *Observer) stateOf(s *broker.SessionInfo) *sessionState {
	if st, ok := s.ObserverState.(*sessionState); ok {
		return st
	}
	return o.state(s.SessionID)
}

func (st *sessionState) next() int64 {
	st.mu.Lock()
	st.ei++
	ei := st.ei
	st.mu.Unlock()
	return ei
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

// Auth counts an authentication request and its checks.
func (o *Observer) Auth(ctx context.Context, r *broker.AuthRequest) {
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
	if r.Failure == "" {
		if o.log.Enabled(ctx, slog.LevelDebug) {
			o.log.DebugContext(ctx, "authentication succeeded", "request_id", r.RequestID,
				"duration", r.Durations[broker.StageTotal])
		}
		return
	}
	// Throttling and backend trouble are not the caller's fault; everything
	// else is a refusal an operator may need to look at.
	level := slog.LevelWarn
	if r.Failure == broker.ReasonBackendError {
		level = slog.LevelError
	}
	attrs := []any{"request_id", r.RequestID, "reason", string(r.Failure),
		"verification", checkString(r.Verification), "matching", checkString(r.Matching),
		"retrieval", checkString(r.Retrieval), "unauthorized", r.Unauthorized}
	// The evidence: who asked for what.
	if r.Upstream != "" || r.Role != "" {
		attrs = append(attrs, "db_service", r.Upstream, "db_user", r.Role)
	}
	if r.ClaimedPrincipal != "" {
		attrs = append(attrs, "claimed_principal", r.ClaimedPrincipal)
	}
	if r.Verification.OK {
		attrs = append(attrs, identityAttr(&r.Identity))
	}
	o.log.Log(ctx, level, "authentication refused", attrs...)
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

// SessionStart audits a session start or refusal; for a successful start an
// audit failure is returned and the session must be refused.
func (o *Observer) SessionStart(ctx context.Context, s *broker.SessionInfo) error {
	var err error
	if !s.Success && o.refusals != nil && !o.refusals.full(time.Now(), sessionRefusal(s)) {
		// Beyond the caller's allowance: counted in a db.refusal.summary.
		o.log.DebugContext(ctx, "session refused (audited in a summary)", append(sessionAttrs(s),
			"sqlstate", s.Code, "error", s.Error)...)
		return nil
	}
	if o.audit != nil {
		st := o.state(s.SessionID)
		err = o.audit.sessionStart(time.Now(), s, st.next())
		if !s.Success || err != nil {
			o.forget(s.SessionID)
		} else {
			st.hdr = newSessionHeader(s)
			s.ObserverState = st
		}
	}
	if !s.Success {
		o.log.WarnContext(ctx, "session refused", append(sessionAttrs(s),
			"sqlstate", s.Code, "error", s.Error, "db_name", s.Database, identityAttr(&s.Identity))...)
		return err
	}
	if err != nil {
		o.log.ErrorContext(ctx, "session refused: audit trail unavailable", append(sessionAttrs(s), "error", err)...)
		return err
	}
	o.m.sessionsActive.Inc()
	o.m.sessionsTotal.Inc()
	o.log.InfoContext(ctx, "session started", append(sessionAttrs(s),
		"db_name", s.Database, "application_name", s.ApplicationName, identityAttr(&s.Identity))...)
	return nil
}

// Query audits a statement before it is forwarded; an error stops forwarding.
func (o *Observer) Query(ctx context.Context, s *broker.SessionInfo, q *broker.QueryEvent) error {
	if o.audit != nil {
		st := o.stateOf(s)
		st.mu.Lock()
		st.ei++
		ei := st.ei
		st.pending = append(st.pending, pendingQuery{q.Index, ei, mentionsPassword(q.Text)})
		st.mu.Unlock()
		if err := o.audit.query(time.Now(), st.hdr, s, q, ei); err != nil {
			st.mu.Lock()
			st.pending = st.pending[:len(st.pending)-1]
			st.mu.Unlock()
			o.log.ErrorContext(ctx, "statement not forwarded: audit trail unavailable",
				append(sessionAttrs(s), "query_index", q.Index, "error", err)...)
			return err
		}
	}
	o.m.queries.Inc()
	if o.log.Enabled(ctx, slog.LevelDebug) {
		o.log.DebugContext(ctx, "statement", append(sessionAttrs(s), "query_index", q.Index, "extended", q.Extended)...)
	}
	return nil
}

// QueryBatch audits the statements of one client read, in order, with one
// write to the audit file: all are durable before any is forwarded, and an
// error means none may be.
func (o *Observer) QueryBatch(ctx context.Context, s *broker.SessionInfo, qs []*broker.QueryEvent) error {
	if o.audit != nil && len(qs) > 0 {
		st := o.stateOf(s)
		st.mu.Lock()
		first := st.ei + 1
		for _, q := range qs {
			st.ei++
			st.pending = append(st.pending, pendingQuery{q.Index, st.ei, mentionsPassword(q.Text)})
		}
		st.mu.Unlock()
		if err := o.audit.queryBatch(time.Now(), st.hdr, s, qs, first); err != nil {
			st.mu.Lock()
			st.pending = st.pending[:max(0, len(st.pending)-len(qs))]
			st.mu.Unlock()
			o.log.ErrorContext(ctx, "statements not forwarded: audit trail unavailable",
				append(sessionAttrs(s), "query_index", qs[0].Index, "statements", len(qs), "error", err)...)
			return err
		}
	}
	o.m.queries.Add(float64(len(qs)))
	return nil
}

var _ broker.QueryBatcher = (*Observer)(nil)

// QueryDone audits a statement's outcome.
func (o *Observer) QueryDone(ctx context.Context, s *broker.SessionInfo, q *broker.QueryEvent) {
	if o.audit != nil {
		st := o.stateOf(s)
		st.mu.Lock()
		st.ei++
		ei := st.ei
		var queryEI int64
		var password bool
		for i, p := range st.pending {
			if p.index == q.Index {
				queryEI, password = p.ei, p.password
				st.pending = append(st.pending[:i], st.pending[i+1:]...)
				break
			}
		}
		st.mu.Unlock()
		// The statement already ran; a failure here is counted and logged by the sink.
		_ = o.audit.queryResult(time.Now(), st.hdr, s, q, ei, queryEI, password)
	}
	if o.log.Enabled(ctx, slog.LevelDebug) {
		o.log.DebugContext(ctx, "statement done", append(sessionAttrs(s), "query_index", q.Index,
			"success", q.Success, "sqlstate", q.Code, "rows", q.Rows, "duration", q.Duration)...)
	}
}

// SessionEnd audits the end of a session SessionStart accepted.
func (o *Observer) SessionEnd(ctx context.Context, s *broker.SessionInfo) {
	o.m.sessionsActive.Dec()
	if o.audit != nil {
		st := o.stateOf(s)
		_ = o.audit.sessionEnd(time.Now(), s, st.next())
		o.forget(s.SessionID)
	}
	level := slog.LevelInfo
	if s.EndReason == "error" || s.EndReason == "audit_unavailable" {
		level = slog.LevelWarn
	}
	end := s.End
	if end.IsZero() {
		end = time.Now()
	}
	o.log.Log(ctx, level, "session ended", append(sessionAttrs(s), "reason", s.EndReason, "error", s.Error,
		"duration", end.Sub(s.Start), "queries", s.Queries, "bytes_in", s.BytesIn, "bytes_out", s.BytesOut)...)
}

func (o *Observer) forget(sid string) {
	o.mu.Lock()
	delete(o.sessions, sid)
	o.mu.Unlock()
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

var _ broker.RoleReporter = (*Observer)(nil)

// Cancel counts and audits a CancelRequest; one that was not forwarded
// (forged or stale key, or a caller other than the session's) is logged at WARN.
func (o *Observer) Cancel(ctx context.Context, c *broker.CancelEvent) {
	if c.Forwarded {
		o.m.cancelForwarded.Inc()
	} else {
		o.m.cancelRejected.Inc()
	}
	if !c.Forwarded && o.refusals != nil && !o.refusals.full(time.Now(), cancelRefusal(c)) {
		o.log.DebugContext(ctx, "cancel request rejected (audited in a summary)", "reason", c.Reason,
			"uid", c.Caller.UID, "pid", c.Caller.PID)
		return
	}
	if o.audit != nil {
		var ei int64
		if c.Session != nil {
			o.mu.Lock()
			st := o.sessions[c.Session.SessionID]
			o.mu.Unlock()
			if st != nil {
				ei = st.next()
			}
		}
		_ = o.audit.cancel(time.Now(), c, ei)
	}
	attrs := []any{"request_id", c.RequestID, identityAttr(&c.Caller)}
	if c.Session != nil {
		attrs = append(attrs, "target_sid", c.Session.SessionID, "target_request_id", c.Session.RequestID,
			"target_pid", c.Session.Identity.PID, "target_uid", c.Session.Identity.UID)
	}
	if c.Forwarded {
		o.log.InfoContext(ctx, "cancel request forwarded", attrs...)
		return
	}
	o.log.WarnContext(ctx, "cancel request rejected", append(attrs, "reason", c.Reason)...)
}

// RelayBytes counts relayed bytes.
func (o *Observer) RelayBytes(toUpstream bool, n int) {
	if toUpstream {
		o.m.relayToUpstream.Add(float64(n))
	} else {
		o.m.relayToClient.Add(float64(n))
	}
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
