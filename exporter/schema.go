package exporter

import (
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.opentelemetry.io/otel/trace"

	"github.com/pgward/pgward/broker"
)

// This file is the audit schema and its encoder: the event names and codes,
// the fields of each event and their order, and how sessions, statements,
// parameters (params.go) and processes are written as JSON (json.go). The
// encoder turns what the Observer reports into an Event; it knows nothing of
// where events go. docs/audit-events.md describes the result, and
// testdata/audit-golden.jsonl pins its bytes.

// Audit event names (the "event" field and the audit_events_total label).
const (
	EventSessionStart = "db.session.start"
	EventSessionEnd   = "db.session.end"
	EventQuery        = "db.session.query"
	EventQueryResult  = "db.session.query.result"
	EventCancel       = "db.session.cancel"
	EventDirect       = "db.connect.direct"
	// EventCheckpoint signs the chain head (checkpoint.go); the file sink
	// writes it into its own chain.
	EventCheckpoint = "audit.checkpoint"
	// EventRefusalSummary counts refusals beyond the audit allowance (aggregate.go).
	EventRefusalSummary = "db.refusal.summary"
)

// EventKind is which audit event an Event is.
type EventKind uint8

// The event kinds, one per event name.
const (
	kindSessionStart EventKind = iota
	kindSessionEnd
	kindQuery
	kindQueryResult
	kindCancel
	kindDirect
	kindCheckpoint
	kindRefusalSummary
	kindAdminSessionsList
	kindAdminSessionsEnd
	numKinds
)

var eventNames = [numKinds]string{
	kindSessionStart:   EventSessionStart,
	kindSessionEnd:     EventSessionEnd,
	kindQuery:          EventQuery,
	kindQueryResult:    EventQueryResult,
	kindCancel:         EventCancel,
	kindDirect:         EventDirect,
	kindCheckpoint:     EventCheckpoint,
	kindRefusalSummary: EventRefusalSummary,

	// Admin actions (admin.go).
	kindAdminSessionsList: EventAdminSessionsList,
	kindAdminSessionsEnd:  EventAdminSessionsEnd,
}

// String is the event's name, as in its "event" field.
func (k EventKind) String() string {
	if k < numKinds {
		return eventNames[k]
	}
	return "unknown"
}

// Deferrable says that the event carries no durability requirement: a
// db.session.query.result reports a statement that already ran, so a sink
// may hold it back and store it with the next event that has one (the file
// sink waits at most resultFlushDelay). Every other event must be stored,
// at the configured durability, before the call that hands it over returns.
func (k EventKind) Deferrable() bool { return k == kindQueryResult }

// Event codes: "PGW", two digits for the event, and a severity letter —
// I (information: the action happened as intended) or W (warning: a refusal,
// a failure or a security-relevant anomaly). See docs/audit-events.md.
const (
	CodeSessionStart       = "PGW00I"
	CodeSessionDenied      = "PGW00W"
	CodeSessionEnd         = "PGW01I"
	CodeSessionEndError    = "PGW01W"
	CodeQuery              = "PGW02I"
	CodeQueryResult        = "PGW03I"
	CodeQueryResultError   = "PGW03W"
	CodeCancel             = "PGW04I"
	CodeCancelRejected     = "PGW04W"
	CodeDirectConnect      = "PGW05W"
	CodeDirectConnectBlock = "PGW06W"
	CodeCheckpoint         = "PGW07I"
	CodeRefusalSummary     = "PGW08W"
)

// DirectConnectEvent is a connect to a guarded Postgres endpoint by a process
// other than pgward, seen by the eBPF tracker.
type DirectConnectEvent struct {
	Time     time.Time       // when the connect happened; zero means now
	Process  broker.Identity // who connected (from the eBPF record and /proc)
	Dest     string          // the endpoint: host:port or a socket path
	Upstream string          // the upstream's name in the config, when the endpoint is one
	Blocked  bool            // the program refused the connect (ebpf.enforce)
}

// header starts an event object: every field the contract puts on every event.
func header(buf []byte, now time.Time, event, code string, s *broker.SessionInfo, ei int64, requestID string, id *broker.Identity) []byte {
	buf = headerStart(buf, now, event, code)
	buf = appendSID(buf, s)
	buf = appendIntField(buf, "ei", ei)
	return appendSessionFields(buf, s, requestID, id)
}

// headerStart opens an event with the fields that differ on every line.
func headerStart(buf []byte, now time.Time, event, code string) []byte {
	buf = append(buf, '{')
	buf = appendStringField(buf, "event", event)
	buf = appendStringField(buf, "code", code)
	buf = appendKey(buf, "time")
	buf = append(buf, '"')
	buf = now.UTC().AppendFormat(buf, time.RFC3339Nano)
	buf = append(buf, '"')
	buf = appendKey(buf, "uid")
	return appendUUID(buf)
}

func appendSID(buf []byte, s *broker.SessionInfo) []byte {
	var sid string
	if s != nil {
		sid = s.SessionID
	}
	return appendStringField(buf, "sid", sid)
}

// appendSessionFields appends the session's fields after "ei": request_id
// through process.
func appendSessionFields(buf []byte, s *broker.SessionInfo, requestID string, id *broker.Identity) []byte {
	var proto, service, uri, name, user, principal string
	if s != nil {
		proto, service, uri, name, user, principal = s.Protocol, s.Upstream, s.URI, s.Database, s.User, s.Principal
	}
	if proto == "" {
		proto = "postgres"
	}
	buf = appendStringField(buf, "request_id", requestID)
	buf = appendStringField(buf, "db_protocol", proto)
	buf = appendStringField(buf, "db_service", service)
	buf = appendStringField(buf, "db_uri", uri)
	buf = appendStringField(buf, "db_name", name)
	buf = appendStringField(buf, "db_user", user)
	buf = appendStringField(buf, "principal", principal)
	buf = appendKey(buf, "process")
	return appendProcess(buf, id)
}

// sessionHeader is what header appends for a statement event (query,
// query.result) of one session apart from event, code, time, uid and ei:
// encoded once when the session starts rather than on every statement.
// Nothing in it changes during a session.
type sessionHeader struct {
	sid  []byte // ,"sid":"…"
	rest []byte // ,"request_id":… through the process object
}

func newSessionHeader(s *broker.SessionInfo) *sessionHeader {
	// A leading placeholder makes appendKey write the comma the fields
	// need after what precedes them; it is cut off again.
	sid := appendSID([]byte{'x'}, s)
	rest := appendSessionFields([]byte{'x'}, s, s.RequestID, &s.Identity)
	return &sessionHeader{sid: sid[1:], rest: rest[1:]}
}

// header is header(buf, now, event, code, s, ei, s.RequestID, &s.Identity)
// for the session h was made for; h nil builds it field by field.
func (h *sessionHeader) header(buf []byte, now time.Time, event, code string, s *broker.SessionInfo, ei int64) []byte {
	if h == nil {
		return header(buf, now, event, code, s, ei, s.RequestID, &s.Identity)
	}
	buf = headerStart(buf, now, event, code)
	buf = append(buf, h.sid...)
	buf = appendIntField(buf, "ei", ei)
	return append(buf, h.rest...)
}

// appendUUID appends a random (version 4) UUID as a JSON string. The runtime's
// ChaCha8 generator behind math/rand/v2 is per-thread and allocation-free.
func appendUUID(buf []byte) []byte {
	var b [16]byte
	hi, lo := rand.Uint64(), rand.Uint64()
	for i := range 8 {
		b[i] = byte(hi >> (56 - 8*i))
		b[8+i] = byte(lo >> (56 - 8*i))
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	buf = append(buf, '"')
	for i, c := range b {
		if i == 4 || i == 6 || i == 8 || i == 10 {
			buf = append(buf, '-')
		}
		buf = append(buf, hexDigits[c>>4], hexDigits[c&0xf])
	}
	return append(buf, '"')
}

func appendProcess(buf []byte, id *broker.Identity) []byte {
	if id == nil {
		return append(buf, "null"...)
	}
	buf = append(buf, '{')
	buf = appendIntField(buf, "pid", int64(id.PID))
	buf = appendUintField(buf, "uid", uint64(id.UID))
	buf = appendUintField(buf, "gid", uint64(id.GID))
	buf = appendStringField(buf, "user", id.User)
	buf = appendStringField(buf, "comm", id.Comm)
	buf = appendStringField(buf, "exe", id.Exe)
	buf = appendStringField(buf, "cgroup", id.Cgroup)
	buf = appendStringField(buf, "systemd_unit", id.SystemdUnit)
	buf = appendStringField(buf, "container_id", id.ContainerID)
	if p := id.Pod; p != nil {
		buf = appendKey(buf, "pod")
		buf = append(buf, '{')
		buf = appendStringField(buf, "namespace", p.Namespace)
		buf = appendStringField(buf, "name", p.Name)
		buf = appendStringField(buf, "service_account", p.ServiceAccount)
		buf = appendKey(buf, "labels")
		buf = append(buf, '{')
		var stack [16]string
		keys := stack[:0]
		for k := range p.Labels {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		for _, k := range keys {
			if len(buf) > 0 && buf[len(buf)-1] != '{' {
				buf = append(buf, ',')
			}
			buf = appendJSONString(buf, k)
			buf = append(buf, ':')
			buf = appendJSONString(buf, p.Labels[k])
		}
		buf = append(buf, '}', '}')
	}
	buf = appendUintField(buf, "start_time", id.StartTime)
	buf = appendUintField(buf, "cgroup_id", id.CgroupID)
	buf = appendIntField(buf, "ns_pid", int64(id.NSPID))
	buf = appendBoolField(buf, "attested", id.Attested)
	buf = appendBoolField(buf, "pinned", id.Pinned)
	return append(buf, '}')
}

func appendTimeField(buf []byte, key string, t time.Time) []byte {
	buf = appendKey(buf, key)
	if t.IsZero() {
		return append(buf, "null"...)
	}
	buf = append(buf, '"')
	buf = t.UTC().AppendFormat(buf, time.RFC3339Nano)
	return append(buf, '"')
}

func appendMillisField(buf []byte, key string, d time.Duration) []byte {
	return strconv.AppendFloat(appendKey(buf, key), float64(d)/float64(time.Millisecond), 'f', 3, 64)
}

// encoder builds event bodies: the JSON object of an event without its
// closing brace, which the sink completes (the file sink with seq and
// prev_hash). Each method returns a buffer from the encoder's linePool; the
// caller hands it to putBuf once the sinks have it. Safe for concurrent use.
type encoder struct {
	params ParamMode // audit.parameters
	linePool
}

func newEncoder(params ParamMode) *encoder {
	if params == "" {
		params = ParamsRedacted
	}
	return &encoder{params: params}
}

// The event builders below make one body each.

func (e *encoder) sessionStart(now time.Time, s *broker.SessionInfo, ei int64) *[]byte {
	b := e.getBuf()
	code := CodeSessionStart
	if !s.Success {
		code = CodeSessionDenied
	}
	buf := header(*b, now, EventSessionStart, code, s, ei, s.RequestID, &s.Identity)
	buf = appendBoolField(buf, "success", s.Success)
	buf = appendStringFieldOmit(buf, "error", s.Error)
	buf = appendStringFieldOmit(buf, "sqlstate", s.Code)
	buf = appendStringFieldOmit(buf, "application_name", s.ApplicationName)
	buf = appendTimeField(buf, "session_start", s.Start)
	if m := s.RoleMemberships; m != nil {
		// What the login role can become (learned at the credential's
		// first use): SET ROLE to these, or any role as a superuser.
		buf = appendKey(buf, "db_role_memberships")
		buf = append(buf, '[')
		for i, r := range m.Roles {
			if i > 0 {
				buf = append(buf, ',')
			}
			buf = appendJSONString(buf, r)
		}
		buf = append(buf, ']')
		buf = appendBoolField(buf, "db_role_superuser", m.Superuser)
	}
	*b = buf
	return b
}

func (e *encoder) sessionEnd(now time.Time, s *broker.SessionInfo, ei int64) *[]byte {
	b := e.getBuf()
	code := CodeSessionEnd
	failed := s.EndReason.Failed()
	if failed {
		code = CodeSessionEndError
	}
	buf := header(*b, now, EventSessionEnd, code, s, ei, s.RequestID, &s.Identity)
	buf = appendBoolField(buf, "success", !failed)
	buf = appendStringFieldOmit(buf, "error", s.Error)
	buf = appendStringField(buf, "reason", string(s.EndReason))
	buf = appendTimeField(buf, "session_start", s.Start)
	end := s.End
	if end.IsZero() {
		end = now
	}
	buf = appendTimeField(buf, "session_stop", end)
	buf = appendIntField(buf, "bytes_in", s.BytesIn)
	buf = appendIntField(buf, "bytes_out", s.BytesOut)
	buf = appendIntField(buf, "queries", s.Queries)
	*b = buf
	return b
}

// appendSpanID appends "span_id", the hex id of the statement's span, when
// the statement has one (its trace is sampled).
func appendSpanID(buf []byte, id trace.SpanID) []byte {
	if !id.IsValid() {
		return buf
	}
	buf = appendKey(buf, "span_id")
	buf = append(buf, '"')
	for _, c := range id {
		buf = append(buf, hexDigits[c>>4], hexDigits[c&0xf])
	}
	return append(buf, '"')
}

// query builds a db.session.query event; span is the statement's span id
// (zero: none).
func (e *encoder) query(now time.Time, h *sessionHeader, s *broker.SessionInfo, q *broker.QueryEvent, ei int64, span trace.SpanID) *[]byte {
	b := e.getBuf()
	buf := h.header(*b, now, EventQuery, CodeQuery, s, ei)
	buf = appendBoolField(buf, "success", true)
	text, secret := redactSQL(q.Text)
	buf = appendStringField(buf, "db_query", text)
	if (q.Extended || q.FunctionOID != 0) && e.params != ParamsNone {
		buf = appendKey(buf, "db_query_parameters")
		buf = append(buf, '[')
		for i, p := range q.Params {
			if i > 0 {
				buf = append(buf, ',')
			}
			buf = appendParam(buf, p, e.params, slices.Contains(secret, i+1))
		}
		buf = append(buf, ']')
	}
	buf = appendIntField(buf, "query_index", q.Index)
	buf = appendSpanID(buf, span)
	buf = appendBoolField(buf, "extended", q.Extended)
	if q.RoleChange {
		buf = appendBoolField(buf, "role_change", true)
	}
	if q.Extended {
		buf = appendStringField(buf, "statement_name", q.Statement)
		buf = appendStringField(buf, "portal_name", q.Portal)
		if q.BindOnly {
			buf = appendBoolField(buf, "bind_only", true)
		}
		if q.PortalUnverified {
			buf = appendBoolField(buf, "portal_unverified", true)
		}
	}
	if q.FunctionOID != 0 {
		buf = appendIntField(buf, "function_oid", int64(q.FunctionOID))
	}
	*b = buf
	return b
}

// queryResult builds a db.session.query.result event. With
// password set (the statement mentions a password) the server's message for
// a syntax error (42601) or a data exception (class 22) is replaced: those
// quote the text they stopped at, which can be part of a password literal
// ('a' 'b' on one line), and a message in another lc_messages language
// cannot be picked apart reliably. Other messages (permission denied, role
// does not exist) name objects, not values, and are kept.
func (e *encoder) queryResult(now time.Time, h *sessionHeader, s *broker.SessionInfo, q *broker.QueryEvent, ei, queryEI int64, span trace.SpanID, password bool) *[]byte {
	b := e.getBuf()
	code := CodeQueryResult
	if !q.Success {
		code = CodeQueryResultError
	}
	buf := h.header(*b, now, EventQueryResult, code, s, ei)
	buf = appendBoolField(buf, "success", q.Success)
	errText := q.Error
	if password && errText != "" && (q.Code == "42601" || strings.HasPrefix(q.Code, "22")) {
		errText = redactedError
	}
	buf = appendStringFieldOmit(buf, "error", errText)
	buf = appendStringFieldOmit(buf, "sqlstate", q.Code)
	buf = appendIntField(buf, "query_index", q.Index)
	buf = appendIntField(buf, "query_ei", queryEI)
	buf = appendSpanID(buf, span)
	if q.Rows >= 0 {
		buf = appendIntField(buf, "rows", q.Rows)
	}
	buf = appendStringFieldOmit(buf, "command_tag", q.Tag)
	buf = appendStringFieldOmit(buf, "server_role_report", q.ServerRole)
	buf = appendMillisField(buf, "duration_ms", q.Duration)
	*b = buf
	return b
}

func (e *encoder) cancel(now time.Time, c *broker.CancelEvent, ei int64) *[]byte {
	b := e.getBuf()
	code := CodeCancel
	if !c.Forwarded {
		code = CodeCancelRejected
	}
	buf := header(*b, now, EventCancel, code, c.Session, ei, c.RequestID, &c.Caller)
	buf = appendBoolField(buf, "success", c.Forwarded)
	buf = appendStringFieldOmit(buf, "reason", c.Reason)
	if c.Session != nil {
		buf = appendStringField(buf, "target_request_id", c.Session.RequestID)
		buf = appendIntField(buf, "target_pid", int64(c.Session.Identity.PID))
	}
	*b = buf
	return b
}

func (e *encoder) directConnect(now time.Time, d *DirectConnectEvent) *[]byte {
	b := e.getBuf()
	code := CodeDirectConnect
	if d.Blocked {
		code = CodeDirectConnectBlock
	}
	s := broker.SessionInfo{Upstream: d.Upstream, URI: d.Dest}
	buf := header(*b, now, EventDirect, code, &s, 0, "", &d.Process)
	buf = appendBoolField(buf, "success", !d.Blocked)
	buf = appendBoolField(buf, "blocked", d.Blocked)
	buf = appendTimeField(buf, "connect_time", d.Time)
	*b = buf
	return b
}

// refusalSummary builds one db.refusal.summary event (aggregate.go).
func (e *encoder) refusalSummary(now time.Time, s *refusalSummary) *[]byte {
	b := e.getBuf()
	si := broker.SessionInfo{Upstream: s.b.service, User: s.b.user}
	id := &s.b.sample
	if s.key.cgroup == unknownCaller || s.key.cgroup == overflowCgroup {
		id = nil
	}
	buf := header(*b, now, EventRefusalSummary, CodeRefusalSummary, &si, 0, "", id)
	buf = appendBoolField(buf, "success", false)
	buf = appendStringField(buf, "refused", s.key.refused)
	buf = appendStringField(buf, "reason", s.key.reason)
	buf = appendStringFieldOmit(buf, "sqlstate", s.b.sqlstate)
	buf = appendStringFieldOmit(buf, "error", s.b.message)
	buf = appendUintField(buf, "caller_uid", uint64(s.key.uid))
	buf = appendStringField(buf, "caller_cgroup", s.key.cgroup)
	buf = appendIntField(buf, "count", s.b.count)
	buf = appendTimeField(buf, "first_time", s.b.first)
	buf = appendTimeField(buf, "last_time", s.b.prev)
	buf = appendIntField(buf, "interval_s", int64(refusalInterval/time.Second))
	*b = buf
	return b
}
