package exporter

import (
	"context"
	"time"

	"github.com/pgward/pgward/broker"
)

// Admin actions (the local admin API, `pgward sessions`): each is audited
// with the operator's process as the event's process.
const (
	// EventAdminSessionsList: an operator listed the live sessions.
	EventAdminSessionsList = "admin.sessions.list"
	// EventAdminSessionsEnd: an operator ended a session (one event per
	// session asked for, with the session's sid and fields).
	EventAdminSessionsEnd = "admin.sessions.end"

	CodeAdminSessionsList       = "PGW09I"
	CodeAdminSessionsListDenied = "PGW09W"
	CodeAdminSessionsEnd        = "PGW10I"
	CodeAdminSessionsEndFailed  = "PGW10W"
)

// AdminEvent is one action of an operator on the admin socket.
type AdminEvent struct {
	// Event is EventAdminSessionsList or EventAdminSessionsEnd.
	Event string
	// RequestID identifies the admin request (one per request: every
	// session an end names shares it).
	RequestID string
	// Operator is the process that asked, from its peer credentials.
	Operator broker.Identity
	// Session is the target session of an end (nil for a list or an
	// unknown sid).
	Session *broker.SessionStatus
	// TargetSID is the sid an end named.
	TargetSID string
	// Reason is the operator's --reason.
	Reason string
	// Count is how many sessions a list returned.
	Count int
	// Success is false when the request was refused (not root) or the sid
	// is not a live session; Error says why.
	Success bool
	Error   string
}

// Admin audits an admin action and logs it (WARN when refused or failed).
// The error is the audit sink's: in fsync/write durability the action
// must not go ahead unaudited.
func (o *Observer) Admin(ctx context.Context, e AdminEvent) error {
	var err error
	if o.audit != nil {
		err = o.audit.admin(time.Now(), &e)
	}
	attrs := []any{"event", e.Event, "admin_request_id", e.RequestID, "success", e.Success, identityAttr(&e.Operator)}
	if e.TargetSID != "" {
		attrs = append(attrs, "target_sid", e.TargetSID)
	}
	if e.Reason != "" {
		attrs = append(attrs, "reason", e.Reason)
	}
	if e.Error != "" {
		attrs = append(attrs, "error", e.Error)
	}
	if e.Success {
		o.log.InfoContext(ctx, "admin action", attrs...)
	} else {
		o.log.WarnContext(ctx, "admin action refused or failed", attrs...)
	}
	return err
}

func (a *Audit) admin(now time.Time, e *AdminEvent) error {
	kind := kindAdminSessionsList
	if e.Event == EventAdminSessionsEnd {
		kind = kindAdminSessionsEnd
	}
	return a.append(kind, a.enc.admin(now, kind, e))
}

// admin builds one admin.sessions.list or admin.sessions.end event.
func (enc *encoder) admin(now time.Time, kind EventKind, e *AdminEvent) *[]byte {
	b := enc.getBuf()
	code := CodeAdminSessionsList
	switch {
	case kind == kindAdminSessionsEnd && e.Success:
		code = CodeAdminSessionsEnd
	case kind == kindAdminSessionsEnd:
		code = CodeAdminSessionsEndFailed
	case !e.Success:
		code = CodeAdminSessionsListDenied
	}
	var s broker.SessionInfo
	if t := e.Session; t != nil {
		s = broker.SessionInfo{SessionID: t.SessionID, Upstream: t.Upstream, Database: t.Database, URI: t.URI, User: t.Role, Principal: t.Principal}
	} else {
		s.SessionID = e.TargetSID
	}
	buf := header(*b, now, kind.String(), code, &s, 0, e.RequestID, &e.Operator)
	buf = appendBoolField(buf, "success", e.Success)
	buf = appendStringFieldOmit(buf, "error", e.Error)
	buf = appendStringFieldOmit(buf, "reason", e.Reason)
	if kind == kindAdminSessionsList && e.Success {
		buf = appendIntField(buf, "sessions", int64(e.Count))
	}
	if t := e.Session; t != nil {
		buf = appendStringField(buf, "target_request_id", t.RequestID)
		buf = appendIntField(buf, "target_pid", int64(t.Process.PID))
	}
	*b = buf
	return b
}

// RedactStatement is what an operator may see of a statement's text: its
// password literals replaced, as the audit writes it (a literal cut short
// at the end of a line is replaced too).
func RedactStatement(sql string) string {
	r, _ := redactSQL(sql)
	return r
}
