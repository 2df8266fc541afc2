package broker

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
)

const relayBufSize = 32 << 10

type pendingKind uint8

const (
	pendQuery    pendingKind = iota + 1 // simple Query or FunctionCall: ends at ReadyForQuery
	pendExecute                         // ends at CommandComplete/EmptyQuery/PortalSuspended/Error
	pendSync                            // a Sync: its ReadyForQuery closes what precedes it
	pendDescribe                        // Describe of a statement: its ParameterDescription gives the types
)

type pending struct {
	kind pendingKind
	q    *QueryEvent
	stmt *stmtInfo
	span trace.Span
}

// stmtInfo is what Parse told us about a prepared statement.
type stmtInfo struct {
	text string
	oids []uint32 // from Parse, completed by ParameterDescription
}

// portalInfo is what Bind told us; values live in buf.
type portalInfo struct {
	stmt   *stmtInfo
	params []Param
	buf    []byte
}

// tracker follows the statements of a session for audit. The client pump
// adds; the upstream pump completes. mu guards queue and stmt oids; it is
// never held across I/O.
type tracker struct {
	mu      sync.Mutex
	queue   []pending
	stmts   map[string]*stmtInfo   // client pump only (oids under mu)
	portals map[string]*portalInfo // client pump only
	index   int64
}

func (t *tracker) push(p pending) {
	t.mu.Lock()
	t.queue = append(t.queue, p)
	t.mu.Unlock()
}

// run relays until either side ends, then ends the session. It owns both
// connections from here on and closes them.
func (sess *session) run() {
	tr := &tracker{stmts: map[string]*stmtInfo{}, portals: map[string]*portalInfo{}}
	upDone := make(chan struct{})
	var clientGone bool
	var clientMu sync.Mutex
	go func() {
		defer close(upDone)
		sess.pumpUpstream(tr, func() bool { clientMu.Lock(); defer clientMu.Unlock(); return clientGone })
		sess.client.Close()
	}()
	if sess.lease != nil && sess.lease.Done != nil {
		go func() {
			select {
			case <-sess.lease.Done:
				reason := "lease_expired"
				if sess.lease.Reason != nil {
					reason = sess.lease.Reason()
				}
				sess.log.Warn("credential lease ended: ending session", "reason", reason)
				sess.terminate(reason, CodeAdminShutdown, "pgward ended this session: its database credential lease ended ("+reason+")")
			case <-upDone:
			}
		}()
	}

	clientErr := sess.pumpClient(tr)
	clientMu.Lock()
	clientGone = true
	clientMu.Unlock()
	if clientErr == nil {
		// Client finished (Terminate or EOF): half-close, let the server end.
		if cw, ok := sess.up.conn.(interface{ CloseWrite() error }); ok {
			_ = cw.CloseWrite()
		}
		select {
		case <-upDone:
		case <-time.After(5 * time.Second):
			sess.up.conn.Close()
		}
	} else {
		sess.up.conn.Close()
	}
	<-upDone
	sess.up.conn.Close()

	reason, _, _ := sess.termination()
	if reason == "" {
		if clientErr == nil {
			reason = "client_closed"
		} else if errors.Is(clientErr, errUpstreamGone) {
			reason = "upstream_closed"
		} else {
			reason = "error"
		}
	}
	// Statements that never completed.
	tr.mu.Lock()
	for _, p := range tr.queue {
		if p.q != nil {
			p.q.Success, p.q.Code, p.q.Error = false, CodeConnectionFailure, "session ended before the statement completed"
			p.q.Duration = time.Since(p.q.Start)
			sess.srv.obs.QueryDone(sess.ctx, &sess.info, p.q)
			if p.span != nil {
				p.span.End()
			}
		}
	}
	tr.queue = nil
	tr.mu.Unlock()
	sess.info.EndReason = reason
	sess.info.End = time.Now()
	sess.info.Queries = tr.index
	sess.srv.obs.SessionEnd(sess.ctx, &sess.info)
	sess.log.Info("session ended", "reason", reason, "queries", tr.index, "bytes_in", sess.info.BytesIn, "bytes_out", sess.info.BytesOut)
}

var errUpstreamGone = errors.New("upstream connection closed")

// pumpClient copies client → upstream, auditing each statement before it is
// forwarded. It returns nil when the client ended the session normally.
func (sess *session) pumpClient(tr *tracker) error {
	buf := make([]byte, relayBufSize)
	n := 0
	var events []*pending
	fs := &frameScanner{maxBody: sess.srv.state.Load().cfg.Listen.maxMessageSize()}
	for _, t := range []byte{'Q', 'P', 'B', 'E', 'C', 'F', 'S', 'D', 'X'} {
		fs.want[t] = true
	}
	terminated := false
	fs.inspect = func(typ byte, body []byte) error {
		p, err := sess.frontendMessage(tr, typ, body)
		if err != nil {
			return err
		}
		if typ == 'X' {
			terminated = true
		}
		if p != nil {
			events = append(events, p)
		}
		return nil
	}
	for {
		m, rerr := sess.client.Read(buf[n:])
		n += m
		if m > 0 {
			events = events[:0]
			fwd, need, err := fs.scan(buf[:n])
			if err != nil {
				sess.log.Warn("malformed message from client", "err", err)
				sess.terminate("protocol_error", CodeProtocolViolation, "pgward received a malformed message and closed the session")
				return err
			}
			// Audit first: nothing reaches the database unaudited.
			for _, p := range events {
				if err := sess.srv.obs.Query(sess.ctx, &sess.info, p.q); err != nil {
					sess.log.Error("audit log unavailable: stopping this session", "err", err)
					sess.terminate("audit_unavailable", CodeIOError, "pgward's audit log is unavailable, so the statement was not sent; the session is closed")
					return err
				}
			}
			if fwd > 0 {
				if _, err := sess.up.conn.Write(buf[:fwd]); err != nil {
					return errUpstreamGone
				}
				sess.info.BytesIn += int64(fwd)
				sess.srv.obs.RelayBytes(true, fwd)
				copy(buf, buf[fwd:n])
				n -= fwd
			}
			if need > len(buf) {
				nb := make([]byte, need)
				copy(nb, buf[:n])
				buf = nb
			} else if need == 0 && len(buf) > relayBufSize && n < relayBufSize {
				nb := make([]byte, relayBufSize)
				copy(nb, buf[:n])
				buf = nb
			}
			if terminated {
				return nil
			}
		}
		if rerr != nil {
			if errors.Is(rerr, io.EOF) {
				return nil
			}
			if errors.Is(rerr, net.ErrClosed) {
				return errUpstreamGone
			}
			return rerr
		}
	}
}

// frontendMessage records what a client message means for audit. It returns
// a pending statement to audit before forwarding, or nil.
func (sess *session) frontendMessage(tr *tracker, typ byte, body []byte) (*pending, error) {
	bad := func(what string) error { return fmt.Errorf("%w: malformed %s message", errProtocol, what) }
	switch typ {
	case 'Q':
		text, _, ok := cstring(body)
		if !ok {
			return nil, bad("Query")
		}
		tr.index++
		p := pending{kind: pendQuery, q: &QueryEvent{Index: tr.index, Text: text, Start: time.Now(), Rows: -1}}
		p.span = sess.statementSpan(p.q)
		tr.push(p)
		return &p, nil
	case 'F':
		if len(body) < 4 {
			return nil, bad("FunctionCall")
		}
		tr.index++
		oid := binary.BigEndian.Uint32(body)
		p := pending{kind: pendQuery, q: &QueryEvent{Index: tr.index, Text: "<function call oid " + strconv.FormatUint(uint64(oid), 10) + ">", Start: time.Now(), Rows: -1}}
		tr.push(p)
		return &p, nil
	case 'P':
		name, rest, ok := cstring(body)
		if !ok {
			return nil, bad("Parse")
		}
		text, rest, ok := cstring(rest)
		if !ok || len(rest) < 2 {
			return nil, bad("Parse")
		}
		np := int(binary.BigEndian.Uint16(rest))
		rest = rest[2:]
		if np < 0 || len(rest) < 4*np {
			return nil, bad("Parse")
		}
		si := &stmtInfo{text: text, oids: make([]uint32, np)}
		for i := range np {
			si.oids[i] = binary.BigEndian.Uint32(rest[4*i:])
		}
		tr.stmts[name] = si
	case 'B':
		portal, rest, ok := cbytes(body)
		if !ok {
			return nil, bad("Bind")
		}
		stmtName, rest, ok := cbytes(rest)
		if !ok || len(rest) < 2 {
			return nil, bad("Bind")
		}
		nf := int(binary.BigEndian.Uint16(rest))
		rest = rest[2:]
		if len(rest) < 2*nf+2 {
			return nil, bad("Bind")
		}
		formats := rest[:2*nf]
		rest = rest[2*nf:]
		np := int(binary.BigEndian.Uint16(rest))
		rest = rest[2:]
		pi := tr.portals[string(portal)]
		if pi == nil {
			pi = &portalInfo{}
			tr.portals[string(portal)] = pi
		}
		pi.stmt = tr.stmts[string(stmtName)]
		pi.params = pi.params[:0]
		pi.buf = pi.buf[:0]
		type span struct{ off, n int }
		var offs [16]span
		spans := offs[:0]
		for i := range np {
			if len(rest) < 4 {
				return nil, bad("Bind")
			}
			l := int(int32(binary.BigEndian.Uint32(rest)))
			rest = rest[4:]
			var f int16
			switch {
			case nf == 1:
				f = int16(binary.BigEndian.Uint16(formats))
			case nf > i:
				f = int16(binary.BigEndian.Uint16(formats[2*i:]))
			}
			var oid uint32
			if pi.stmt != nil {
				tr.mu.Lock()
				if i < len(pi.stmt.oids) {
					oid = pi.stmt.oids[i]
				}
				tr.mu.Unlock()
			}
			if l < 0 {
				pi.params = append(pi.params, Param{OID: oid, Format: f})
				spans = append(spans, span{-1, 0})
				continue
			}
			if len(rest) < l {
				return nil, bad("Bind")
			}
			spans = append(spans, span{len(pi.buf), l})
			pi.buf = append(pi.buf, rest[:l]...)
			rest = rest[l:]
			pi.params = append(pi.params, Param{OID: oid, Format: f})
		}
		for i, sp := range spans {
			if sp.off >= 0 {
				pi.params[i].Value = pi.buf[sp.off : sp.off+sp.n : sp.off+sp.n]
			}
		}
	case 'E':
		portal, _, ok := cbytes(body)
		if !ok {
			return nil, bad("Execute")
		}
		tr.index++
		q := &QueryEvent{Index: tr.index, Portal: string(portal), Extended: true, Start: time.Now(), Rows: -1}
		if pi := tr.portals[string(portal)]; pi != nil {
			if pi.stmt != nil {
				q.Text = pi.stmt.text
			}
			q.Params = pi.params
		}
		p := pending{kind: pendExecute, q: q}
		p.span = sess.statementSpan(q)
		tr.push(p)
		return &p, nil
	case 'C':
		if len(body) < 2 {
			return nil, bad("Close")
		}
		name, _, ok := cstring(body[1:])
		if !ok {
			return nil, bad("Close")
		}
		if body[0] == 'S' {
			delete(tr.stmts, name)
		} else {
			delete(tr.portals, name)
		}
	case 'D':
		if len(body) < 2 {
			return nil, bad("Describe")
		}
		if body[0] == 'S' {
			name, _, ok := cstring(body[1:])
			if !ok {
				return nil, bad("Describe")
			}
			if si := tr.stmts[name]; si != nil {
				tr.push(pending{kind: pendDescribe, stmt: si})
			}
		}
	case 'S':
		tr.push(pending{kind: pendSync})
	}
	return nil, nil
}

// pumpUpstream copies upstream → client and completes audited statements.
// When it ends it tells the client why if it can, at a message boundary.
func (sess *session) pumpUpstream(tr *tracker, clientGone func() bool) {
	buf := make([]byte, relayBufSize)
	n := 0
	fs := &frameScanner{maxBody: sess.srv.state.Load().cfg.Listen.maxMessageSize()}
	for _, t := range []byte{'C', 'E', 'I', 's', 'Z', 't'} {
		fs.want[t] = true
	}
	var done []pending
	fs.inspect = func(typ byte, body []byte) error {
		done = sess.backendMessage(tr, typ, body, done)
		return nil
	}
	for {
		m, rerr := sess.up.conn.Read(buf[n:])
		n += m
		if m > 0 {
			done = done[:0]
			fwd, need, err := fs.scan(buf[:n])
			if err != nil {
				sess.log.Error("malformed message from upstream", "err", err)
				sess.terminate("protocol_error", CodeConnectionFailure, "pgward received a malformed message from the upstream server and closed the session")
				rerr = err
			}
			if fwd > 0 {
				if _, werr := sess.client.Write(buf[:fwd]); werr != nil {
					sess.finish(tr, done)
					return
				}
				sess.info.BytesOut += int64(fwd)
				sess.srv.obs.RelayBytes(false, fwd)
				copy(buf, buf[fwd:n])
				n -= fwd
			}
			sess.finish(tr, done)
			if need > len(buf) {
				nb := make([]byte, need)
				copy(nb, buf[:n])
				buf = nb
			} else if need == 0 && len(buf) > relayBufSize && n < relayBufSize {
				nb := make([]byte, relayBufSize)
				copy(nb, buf[:n])
				buf = nb
			}
		}
		if rerr != nil {
			if !fs.atBoundary() || clientGone() {
				return
			}
			_, code, msg := sess.termination()
			if code == "" {
				if n > 0 || !errors.Is(rerr, io.EOF) {
					code, msg = CodeConnectionFailure, "pgward lost the connection to the upstream server"
				} else {
					// The server closed cleanly; it has said why itself (e.g. 57P01).
					return
				}
			}
			b, _ := (&pgproto3.ErrorResponse{Severity: "FATAL", SeverityUnlocalized: "FATAL", Code: code, Message: msg}).Encode(nil)
			_ = sess.client.SetWriteDeadline(time.Now().Add(2 * time.Second))
			_, _ = sess.client.Write(b)
			return
		}
	}
}

// backendMessage completes pending statements from a server message and
// appends the completed ones to done.
func (sess *session) backendMessage(tr *tracker, typ byte, body []byte, done []pending) []pending {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	head := func() *pending {
		if len(tr.queue) == 0 {
			return nil
		}
		return &tr.queue[0]
	}
	pop := func() pending {
		p := tr.queue[0]
		tr.queue[0] = pending{}
		tr.queue = tr.queue[1:]
		return p
	}
	switch typ {
	case 't': // ParameterDescription
		h := head()
		if h == nil || h.kind != pendDescribe {
			return done
		}
		p := pop()
		if len(body) >= 2 {
			np := int(binary.BigEndian.Uint16(body))
			if len(body) >= 2+4*np {
				oids := make([]uint32, np)
				for i := range np {
					oids[i] = binary.BigEndian.Uint32(body[2+4*i:])
				}
				p.stmt.oids = oids
			}
		}
	case 'C', 'I', 's':
		for h := head(); h != nil && h.kind == pendDescribe; h = head() {
			pop()
		}
		h := head()
		if h == nil {
			return done
		}
		switch h.kind {
		case pendQuery:
			if typ == 'C' {
				tag, _, _ := cstring(body)
				h.q.Tag = tag
				if r := rowsOf(tag); r >= 0 {
					if h.q.Rows < 0 {
						h.q.Rows = 0
					}
					h.q.Rows += r
				}
			}
		case pendExecute:
			p := pop()
			if typ == 'C' {
				tag, _, _ := cstring(body)
				p.q.Tag = tag
				p.q.Rows = rowsOf(tag)
			}
			if typ == 's' {
				p.q.Tag = "suspended"
			}
			p.q.Success = true
			done = append(done, p)
		}
	case 'E':
		code, msg := errorFields(body)
		h := head()
		if h == nil {
			return done
		}
		switch h.kind {
		case pendQuery:
			h.q.Code, h.q.Error = code, msg
		case pendExecute, pendDescribe:
			p := pop()
			if p.q != nil {
				p.q.Code, p.q.Error = code, msg
				done = append(done, p)
			}
		}
	case 'Z':
		// Everything up to the first Sync (or the simple Query) is over.
		for len(tr.queue) > 0 {
			p := pop()
			switch p.kind {
			case pendSync:
				return done
			case pendQuery:
				p.q.Success = p.q.Code == ""
				return append(done, p)
			case pendExecute:
				if p.q.Code == "" {
					p.q.Code, p.q.Error = "", "not executed: an earlier message in the pipeline failed"
				}
				done = append(done, p)
			}
		}
	}
	return done
}

// finish reports completed statements.
func (sess *session) finish(tr *tracker, done []pending) {
	now := time.Now()
	for _, p := range done {
		p.q.Duration = now.Sub(p.q.Start)
		sess.srv.obs.QueryDone(sess.ctx, &sess.info, p.q)
		if p.span != nil {
			if !p.q.Success {
				p.span.SetStatus(codes.Error, p.q.Code)
				p.span.SetAttributes(attribute.String("db.response.status_code", p.q.Code))
			}
			p.span.End()
		}
	}
}

// statementSpan starts a span for a statement when the session's trace is
// sampled, following the OTel database conventions. Statement text that may
// hold a password is not put on the span.
func (sess *session) statementSpan(q *QueryEvent) trace.Span {
	if !sess.span.IsRecording() {
		return nil
	}
	op := operationName(q.Text)
	text := q.Text
	if containsFold(text, "password") {
		text = "[REDACTED: statement mentions a password]"
	}
	_, sp := sess.srv.tracer.Start(sess.ctx, op, trace.WithSpanKind(trace.SpanKindClient),
		trace.WithAttributes(
			attribute.String("db.system.name", "postgresql"),
			attribute.String("db.namespace", sess.info.Database),
			attribute.String("db.query.text", text),
			attribute.String("db.operation.name", op),
			attribute.String("pgward.request_id", sess.info.RequestID),
		))
	return sp
}

func operationName(text string) string {
	t := strings.TrimSpace(text)
	if i := strings.IndexAny(t, " \t\n\r(;"); i >= 0 {
		t = t[:i]
	}
	if t == "" {
		return "statement"
	}
	return strings.ToUpper(t)
}

func containsFold(s, sub string) bool {
	return bytes.Contains(bytes.ToLower([]byte(s)), []byte(sub))
}

// rowsOf is the row count of a command tag ("SELECT 5", "INSERT 0 5"), or -1.
func rowsOf(tag string) int64 {
	i := strings.LastIndexByte(tag, ' ')
	if i < 0 {
		return -1
	}
	n, err := strconv.ParseInt(tag[i+1:], 10, 64)
	if err != nil {
		return -1
	}
	return n
}

// errorFields returns the SQLSTATE and message of an ErrorResponse body.
func errorFields(body []byte) (code, msg string) {
	for len(body) > 0 && body[0] != 0 {
		t := body[0]
		v, rest, ok := cstring(body[1:])
		if !ok {
			break
		}
		switch t {
		case 'C':
			code = v
		case 'M':
			msg = v
		}
		body = rest
	}
	return code, msg
}
