package broker

import (
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// What an operator sees of live sessions (`pgward sessions`, issue 19) and
// how one ends a session.
//
// The relay keeps a few atomics per session up to date (liveState): bytes
// each way, the statements audited, the transaction status of the last
// ReadyForQuery and the first line of the latest statement. Sessions reads
// them, and the tracker's count of unanswered messages, without stopping the
// relay.

// liveState is the part of a session the relay updates for Sessions.
type liveState struct {
	bytesIn, bytesOut atomic.Int64
	statements        atomic.Int64
	txStatus          atomic.Uint32 // 'I', 'T' or 'E' from the last ReadyForQuery; 0 before any

	// The first line of the latest statement, copied into a fixed array
	// under mu: the relay's hot path allocates nothing for it (the relay
	// benchmarks assert 0 allocs per statement), and Sessions, rare, pays
	// for the string.
	mu        sync.Mutex
	line      [maxStatementLine]byte
	lineLen   int
	lineCut   bool
	lineStart time.Time
	hasLine   bool
}

// maxStatementLine bounds the statement text Sessions reports.
const maxStatementLine = 120

// began records statements about to be forwarded (called by audit, on the
// client pump, with the texts still valid).
func (l *liveState) began(events []*QueryEvent) {
	if len(events) == 0 {
		return
	}
	l.statements.Add(int64(len(events)))
	q := events[len(events)-1]
	line, cut := firstLineOf(q.Text, maxStatementLine)
	l.mu.Lock()
	l.lineLen = copy(l.line[:], line)
	l.lineCut, l.lineStart, l.hasLine = cut, q.Start, true
	l.mu.Unlock()
}

// current is the first line of the latest statement and when it began.
func (l *liveState) current() (line string, start time.Time, ok bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.hasLine {
		return "", time.Time{}, false
	}
	line = string(l.line[:l.lineLen])
	if l.lineCut {
		line += "…"
	}
	return line, l.lineStart, true
}

// firstLineOf is the first non-blank line of s, trimmed, cut at max bytes
// (on a rune boundary); cut says whether anything was left out. It does
// not copy.
func firstLineOf(s string, max int) (line string, cut bool) {
	s = strings.TrimLeft(s, " \t\r\n")
	if i := strings.IndexAny(s, "\r\n"); i >= 0 {
		s, cut = s[:i], true
	}
	s = strings.TrimRight(s, " \t")
	if len(s) > max {
		i := max
		for i > 0 && s[i]&0xC0 == 0x80 {
			i--
		}
		s, cut = s[:i], true
	}
	return s, cut
}

// firstLine is firstLineOf as a copy, with "…" when anything was left out.
func firstLine(s string, max int) string {
	line, cut := firstLineOf(s, max)
	if cut {
		return line + "…"
	}
	return strings.Clone(line)
}

// Session states as Sessions reports them (PostgreSQL's pg_stat_activity
// words).
const (
	StateIdle          = "idle"
	StateActive        = "active"
	StateIdleInTx      = "idle in transaction"
	StateIdleInTxError = "idle in transaction (aborted)"
)

// SessionStatus is one live session as an operator sees it.
type SessionStatus struct {
	SessionID string
	RequestID string
	Principal string
	Upstream  string // the upstream's name (db_service)
	Database  string // the real database name upstream (db_name)
	URI       string // the upstream's address (db_uri)
	Role      string
	Process   Identity
	// BackendPID is the upstream server's process for this session.
	BackendPID uint32
	// Reused: the upstream connection came from the reuse pool.
	Reused bool
	Start  time.Time
	State  string
	// Statement is the first line of the latest statement (password
	// literals are the caller's to redact); StatementStart when it was
	// sent. Both are set while active, and kept after.
	Statement      string
	StatementStart time.Time
	Statements     int64
	BytesIn        int64 // client → upstream
	BytesOut       int64 // upstream → client
}

// Sessions lists the relaying sessions, oldest first.
func (s *Server) Sessions() []SessionStatus {
	s.mu.Lock()
	all := make([]*session, 0, len(s.sessions))
	for sess := range s.sessions {
		all = append(all, sess)
	}
	s.mu.Unlock()
	out := make([]SessionStatus, 0, len(all))
	for _, sess := range all {
		out = append(out, sess.status())
	}
	slices.SortFunc(out, func(a, b SessionStatus) int {
		if c := a.Start.Compare(b.Start); c != 0 {
			return c
		}
		return strings.Compare(a.SessionID, b.SessionID)
	})
	return out
}

func (sess *session) status() SessionStatus {
	st := SessionStatus{
		SessionID: sess.info.SessionID, RequestID: sess.info.RequestID, Principal: sess.info.Principal,
		Upstream: sess.info.Upstream, Database: sess.info.Database, URI: sess.info.URI, Role: sess.info.User, Process: sess.info.Identity,
		BackendPID: sess.up.pid, Reused: sess.reused, Start: sess.info.Start,
		Statements: sess.live.statements.Load(),
		BytesIn:    sess.live.bytesIn.Load(), BytesOut: sess.live.bytesOut.Load(),
	}
	if line, start, ok := sess.live.current(); ok {
		st.Statement, st.StatementStart = line, start
	}
	sess.termMu.Lock()
	tr := sess.tr
	sess.termMu.Unlock()
	switch {
	case tr != nil && tr.unanswered() > 0:
		st.State = StateActive
	case sess.live.txStatus.Load() == 'T':
		st.State = StateIdleInTx
	case sess.live.txStatus.Load() == 'E':
		st.State = StateIdleInTxError
	default:
		st.State = StateIdle
	}
	return st
}

// EndSession ends the session sid the way a revoked grant does: the
// running statement is cancelled upstream first, then the client gets a
// FATAL 57P01 saying an operator ended the session (with reason, when
// given), and the session ends with its audit record (reason
// ended_by_operator). It returns the session's status as it was, and
// false when no live session has that id. It does not wait for the end.
func (s *Server) EndSession(sid, reason string) (SessionStatus, bool) {
	s.mu.Lock()
	var found *session
	for sess := range s.sessions {
		if sess.info.SessionID == sid {
			found = sess
			break
		}
	}
	s.mu.Unlock()
	if found == nil {
		return SessionStatus{}, false
	}
	st := found.status()
	msg := "pgward: an operator ended this session"
	if reason != "" {
		msg += " (" + reason + ")"
	}
	cause := "an operator ended this session"
	if reason != "" {
		cause += ": " + reason
	}
	found.end(EndByOperator, CodeAdminShutdown, msg, cause)
	return st, true
}

// ParkedConn is an idle upstream connection in the reuse pool.
type ParkedConn struct {
	Upstream   string
	Role       string
	User       string // the login user upstream (the credential's, or the role)
	BackendPID uint32
}

// Parked lists the upstream connections parked for reuse.
func (s *Server) Parked() []ParkedConn {
	p := &s.reuse
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []ParkedConn
	for k, es := range p.m {
		for _, e := range es {
			out = append(out, ParkedConn{Upstream: k.upstream, Role: k.role, User: k.user, BackendPID: e.up.pid})
		}
	}
	slices.SortFunc(out, func(a, b ParkedConn) int {
		if c := strings.Compare(a.Upstream, b.Upstream); c != 0 {
			return c
		}
		if c := strings.Compare(a.Role, b.Role); c != 0 {
			return c
		}
		return int(a.BackendPID) - int(b.BackendPID)
	})
	return out
}
