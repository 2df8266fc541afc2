package broker

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"
	"unsafe"

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
	name   string
	stmt   *stmtInfo
	params []Param
	buf    []byte
	// pinned: an Execute of this read, not yet audited, points at params.
	// A Bind to the same portal in the same read (a pipelined batch) then
	// gets a portalInfo of its own rather than overwriting them.
	pinned bool
}

// tracker follows the statements of a session for audit. The client pump
// adds; the upstream pump completes. mu guards queue, free and stmt oids; it
// is never held across I/O.
type tracker struct {
	mu      sync.Mutex
	queue   []pending // queue[head:] are in flight
	head    int
	free    []*QueryEvent          // recycled events (steady state allocates none)
	stmts   map[string]*stmtInfo   // client pump only (oids under mu)
	portals map[string]*portalInfo // client pump only
	tags    map[string]string      // interned command tags; upstream pump only
	index   int64
	pinned  []*portalInfo // portals an unaudited Execute points into; client pump only
	spare   []*portalInfo // replaced portals, to reuse; client pump only
}

// unpin is called once the statements of a read were audited: their
// parameters are no longer needed, so replaced portals may be reused.
func (t *tracker) unpin() {
	for i, pi := range t.pinned {
		pi.pinned = false
		if t.portals[pi.name] != pi && len(t.spare) < 16 {
			t.spare = append(t.spare, pi)
		}
		t.pinned[i] = nil
	}
	t.pinned = t.pinned[:0]
}

func newTracker() *tracker {
	return &tracker{stmts: map[string]*stmtInfo{}, portals: map[string]*portalInfo{}, tags: map[string]string{}}
}

func (t *tracker) push(p pending) {
	t.mu.Lock()
	t.queue = append(t.queue, p)
	t.mu.Unlock()
}

// newEvent returns a cleared QueryEvent, recycled when possible.
func (t *tracker) newEvent() *QueryEvent {
	t.mu.Lock()
	var q *QueryEvent
	if k := len(t.free); k > 0 {
		q = t.free[k-1]
		t.free[k-1] = nil
		t.free = t.free[:k-1]
	}
	t.mu.Unlock()
	if q == nil {
		return &QueryEvent{}
	}
	*q = QueryEvent{}
	return q
}

// recycle takes back events the observer is done with.
func (t *tracker) recycle(done []pending) {
	t.mu.Lock()
	for _, p := range done {
		if p.q != nil && len(t.free) < 64 {
			p.q.Params = nil
			t.free = append(t.free, p.q)
		}
	}
	t.mu.Unlock()
}

// tag returns the command tag b as a string, interned so that the usual
// tags ("SELECT 1", "UPDATE 1") cost no allocation.
func (t *tracker) tag(b []byte) string {
	if s, ok := t.tags[string(b)]; ok {
		return s
	}
	s := string(b)
	if len(t.tags) < 256 {
		t.tags[s] = s
	}
	return s
}

// run relays until either side ends, then ends the session. It owns both
// connections from here on and closes them.
func (sess *session) run() {
	tr := newTracker()
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
	parked := false
	if clientErr == nil && sess.up.reuse != nil {
		// The client left and its Terminate was withheld: stop the upstream
		// pump without closing, and keep the connection if it is idle.
		sess.parking.Store(true)
		_ = sess.up.conn.SetReadDeadline(time.Unix(1, 0))
		<-upDone
		_ = sess.up.conn.SetReadDeadline(time.Time{})
		reason, _, _ := sess.termination()
		tr.mu.Lock()
		quiet := tr.head == len(tr.queue)
		tr.mu.Unlock()
		if reason == "" && quiet && sess.upIdle && sess.clientIdle {
			parked = sess.park()
		}
		if !parked {
			sess.up.terminate()
		}
	} else if clientErr == nil {
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
	if !parked {
		sess.up.conn.Close()
	}

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
	for _, p := range tr.queue[tr.head:] {
		if p.q != nil {
			p.q.Success, p.q.Code, p.q.Error = false, CodeConnectionFailure, "session ended before the statement completed"
			p.q.Duration = time.Since(p.q.Start)
			sess.srv.obs.QueryDone(sess.ctx, &sess.info, p.q)
			if p.span != nil {
				p.span.End()
			}
		}
	}
	tr.queue, tr.head = nil, 0
	tr.mu.Unlock()
	sess.info.EndReason = reason
	sess.info.End = time.Now()
	sess.info.Queries = tr.index
	sess.srv.obs.SessionEnd(sess.ctx, &sess.info)
	sess.log.Info("session ended", "reason", reason, "queries", tr.index, "bytes_in", sess.info.BytesIn, "bytes_out", sess.info.BytesOut)
}

var errUpstreamGone = errors.New("upstream connection closed")

// errWithheld stops a scan at a client Terminate that is not forwarded.
var errWithheld = errors.New("terminate withheld")

// pumpClient copies client → upstream, auditing each statement before it is
// forwarded. It returns nil when the client ended the session normally.
func (sess *session) pumpClient(tr *tracker) error {
	rd := newRelayReader(sess.client)
	defer rd.release()
	var events []*QueryEvent
	fs := &frameScanner{maxBody: sess.srv.state.Load().cfg.Listen.maxMessageSize()}
	for _, t := range []byte{'Q', 'P', 'B', 'E', 'C', 'F', 'S', 'D', 'X'} {
		fs.want[t] = true
	}
	terminated := false
	reusable := sess.up.reuse != nil
	fs.inspect = func(typ byte, body []byte) error {
		if typ == 'X' && reusable {
			// Withheld: the upstream connection may serve another session.
			// Idle only if every message before it was answered (the
			// last one ended a request: Query, Sync, FunctionCall).
			terminated = true
			switch fs.prev {
			case 0, 'Q', 'S', 'F':
				sess.clientIdle = true
			}
			return errWithheld
		}
		q, err := sess.frontendMessage(tr, typ, body)
		if err != nil {
			return err
		}
		if typ == 'X' {
			terminated = true
		}
		if q != nil {
			events = append(events, q)
		}
		return nil
	}
	batch, _ := sess.srv.obs.(QueryBatcher)
	for {
		m, rerr := rd.read()
		if m > 0 {
			for i := range events {
				events[i] = nil
			}
			events = events[:0]
			fwd, need, err := fs.scan(rd.pending())
			if err == errWithheld {
				err = nil
			}
			if err != nil {
				sess.log.Warn("malformed message from client", "err", err)
				sess.terminate("protocol_error", CodeProtocolViolation, "pgward received a malformed message and closed the session")
				return err
			}
			// Audit first: nothing reaches the database unaudited. The
			// statements of one read are audited together, all durable
			// before any of them is forwarded.
			if len(events) > 0 {
				if err := sess.audit(batch, events); err != nil {
					sess.log.Error("audit log unavailable: stopping this session", "err", err)
					sess.terminate("audit_unavailable", CodeIOError, "pgward's audit log is unavailable, so the statement was not sent; the session is closed")
					return err
				}
			}
			tr.unpin()
			if fwd > 0 {
				if _, err := sess.up.conn.Write(rd.pending()[:fwd]); err != nil {
					return errUpstreamGone
				}
				sess.info.BytesIn += int64(fwd)
				sess.srv.obs.RelayBytes(true, fwd)
				rd.consume(fwd)
			}
			rd.reserve(need)
			if terminated {
				return nil
			}
		}
		if rerr != nil {
			if errors.Is(rerr, io.EOF) {
				if rd.n > 0 || !fs.atBoundary() {
					// The client vanished in the middle of a message: what
					// was read of it is dropped, never forwarded whole.
					sess.log.Warn("client closed the connection in the middle of a message", "pending_bytes", rd.n)
				}
				if reusable && rd.n == 0 && fs.atBoundary() {
					switch fs.last {
					case 0, 'Q', 'S', 'F':
						sess.clientIdle = true
					}
				}
				return nil
			}
			if errors.Is(rerr, net.ErrClosed) {
				return errUpstreamGone
			}
			return rerr
		}
	}
}

// QueryBatcher is an optional interface of an Observer: QueryBatch audits
// the statements read from the client together, in order, as Query would
// each of them. An error means none of them may be forwarded.
type QueryBatcher interface {
	QueryBatch(ctx context.Context, s *SessionInfo, qs []*QueryEvent) error
}

// audit hands the statements of one read to the observer before they are
// forwarded. The text of a simple Query points into the relay buffer, so it
// is cleared once the observer has seen it.
func (sess *session) audit(batch QueryBatcher, events []*QueryEvent) error {
	var err error
	if batch != nil && len(events) > 1 {
		err = batch.QueryBatch(sess.ctx, &sess.info, events)
	} else {
		for _, q := range events {
			if err = sess.srv.obs.Query(sess.ctx, &sess.info, q); err != nil {
				break
			}
		}
	}
	for _, q := range events {
		if !q.Extended {
			q.Text = ""
		}
	}
	return err
}

// frontendMessage records what a client message means for audit. It returns
// a pending statement to audit before forwarding, or nil.
func (sess *session) frontendMessage(tr *tracker, typ byte, body []byte) (*QueryEvent, error) {
	bad := func(what string) error { return fmt.Errorf("%w: malformed %s message", errProtocol, what) }
	switch typ {
	case 'Q':
		text, _, ok := cbytes(body)
		if !ok {
			return nil, bad("Query")
		}
		tr.index++
		q := tr.newEvent()
		// The text is only needed until the observer has audited it, before
		// the buffer is reused: no copy.
		q.Index, q.Text, q.Start, q.Rows = tr.index, unsafe.String(unsafe.SliceData(text), len(text)), time.Now(), -1
		p := pending{kind: pendQuery, q: q}
		p.span = sess.statementSpan(q)
		tr.push(p)
		return q, nil
	case 'F':
		if len(body) < 4 {
			return nil, bad("FunctionCall")
		}
		tr.index++
		oid := binary.BigEndian.Uint32(body)
		q := tr.newEvent()
		q.Index, q.Text, q.Start, q.Rows = tr.index, "<function call oid "+strconv.FormatUint(uint64(oid), 10)+">", time.Now(), -1
		q.Extended = false
		tr.push(pending{kind: pendQuery, q: q})
		return q, nil
	case 'P':
		name, rest, ok := cbytes(body)
		if !ok {
			return nil, bad("Parse")
		}
		text, rest, ok := cbytes(rest)
		if !ok || len(rest) < 2 {
			return nil, bad("Parse")
		}
		np := int(binary.BigEndian.Uint16(rest))
		rest = rest[2:]
		if np < 0 || len(rest) < 4*np {
			return nil, bad("Parse")
		}
		// Drivers re-Parse the same text (the unnamed statement, every
		// time): keep what we know of it rather than allocate again.
		if si := tr.stmts[string(name)]; si != nil && si.text == string(text) && sameDeclared(tr, si, rest[:4*np]) {
			break
		}
		si := &stmtInfo{text: string(text), oids: make([]uint32, np)}
		for i := range np {
			si.oids[i] = binary.BigEndian.Uint32(rest[4*i:])
		}
		tr.stmts[string(name)] = si
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
		if pi == nil || pi.pinned {
			if k := len(tr.spare); k > 0 {
				pi = tr.spare[k-1]
				tr.spare = tr.spare[:k-1]
			} else {
				pi = &portalInfo{}
			}
			pi.name = string(portal)
			tr.portals[pi.name] = pi
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
		q := tr.newEvent()
		q.Index, q.Extended, q.Start, q.Rows = tr.index, true, time.Now(), -1
		if len(portal) > 0 {
			q.Portal = string(portal)
		}
		if pi := tr.portals[string(portal)]; pi != nil {
			if pi.stmt != nil {
				q.Text = pi.stmt.text
			}
			q.Params = pi.params
			if !pi.pinned {
				pi.pinned = true
				tr.pinned = append(tr.pinned, pi)
			}
		}
		p := pending{kind: pendExecute, q: q}
		p.span = sess.statementSpan(q)
		tr.push(p)
		return q, nil
	case 'C':
		if len(body) < 2 {
			return nil, bad("Close")
		}
		name, _, ok := cbytes(body[1:])
		if !ok {
			return nil, bad("Close")
		}
		if body[0] == 'S' {
			delete(tr.stmts, string(name))
		} else {
			delete(tr.portals, string(name))
		}
	case 'D':
		if len(body) < 2 {
			return nil, bad("Describe")
		}
		if body[0] == 'S' {
			name, _, ok := cbytes(body[1:])
			if !ok {
				return nil, bad("Describe")
			}
			if si := tr.stmts[string(name)]; si != nil {
				tr.push(pending{kind: pendDescribe, stmt: si})
			}
		}
	case 'S':
		tr.push(pending{kind: pendSync})
	}
	return nil, nil
}

// sameDeclared reports whether the parameter types a Parse declares (raw,
// 4 bytes each) agree with what is known of si: each declared type (0 is
// "let the server choose") equals the known one.
func sameDeclared(tr *tracker, si *stmtInfo, declared []byte) bool {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	np := len(declared) / 4
	if np > len(si.oids) {
		return false
	}
	for i := range np {
		if d := binary.BigEndian.Uint32(declared[4*i:]); d != 0 && d != si.oids[i] {
			return false
		}
	}
	return true
}

// pumpUpstream copies upstream → client and completes audited statements.
// When it ends it tells the client why if it can, at a message boundary.
func (sess *session) pumpUpstream(tr *tracker, clientGone func() bool) {
	rd := newRelayReader(sess.up.conn)
	defer rd.release()
	// What the server sent behind the login's ReadyForQuery, read with it.
	rd.seed(sess.up.pre)
	sess.up.pre = nil
	fs := &frameScanner{maxBody: sess.srv.state.Load().cfg.Listen.maxMessageSize()}
	for _, t := range []byte{'C', 'E', 'I', 's', 'Z', 't'} {
		fs.want[t] = true
	}
	reusable := sess.up.reuse != nil
	if reusable {
		// A parked connection greets its next client with the server's
		// current parameters: follow them.
		fs.want['S'] = true
	}
	var done []pending
	saidWhy := false // the server's last message was a FATAL (or PANIC) ErrorResponse
	var txStatus byte
	fs.inspect = func(typ byte, body []byte) error {
		switch typ {
		case 'S':
			if name, rest, ok := cbytes(body); ok {
				if val, _, ok := cbytes(rest); ok && sess.up.params[string(name)] != string(val) {
					sess.up.params[string(name)] = string(val)
				}
			}
			return nil
		case 'Z':
			if len(body) > 0 {
				txStatus = body[0]
			}
		}
		saidWhy = typ == 'E' && fatalError(body)
		done = sess.backendMessage(tr, typ, body, done)
		return nil
	}
	if reusable {
		defer func() {
			// Nothing relayed yet: still idle after the startup's ReadyForQuery.
			last := fs.last == 0 || (fs.last == 'Z' && txStatus == 'I')
			sess.upIdle = last && fs.atBoundary() && rd.n == 0
		}()
	}
	for {
		m, rerr := rd.read()
		if m > 0 {
			done = done[:0]
			fwd, need, err := fs.scan(rd.pending())
			if err != nil {
				sess.log.Error("malformed message from upstream", "err", err)
				sess.terminate("protocol_error", CodeConnectionFailure, "pgward received a malformed message from the upstream server and closed the session")
				rerr = err
			}
			if fwd > 0 {
				if _, werr := sess.client.Write(rd.pending()[:fwd]); werr != nil {
					sess.finish(tr, done)
					return
				}
				sess.info.BytesOut += int64(fwd)
				sess.srv.obs.RelayBytes(false, fwd)
				rd.consume(fwd)
			}
			sess.finish(tr, done)
			rd.reserve(need)
		}
		if rerr != nil {
			if !fs.atBoundary() || clientGone() || sess.parking.Load() {
				return
			}
			_, code, msg := sess.termination()
			if code == "" {
				if rd.n > 0 || !errors.Is(rerr, io.EOF) || !saidWhy {
					// Killed, crashed or cut off: the server said nothing.
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
		if tr.head == len(tr.queue) {
			return nil
		}
		return &tr.queue[tr.head]
	}
	pop := func() pending {
		p := tr.queue[tr.head]
		tr.queue[tr.head] = pending{}
		tr.head++
		if tr.head == len(tr.queue) {
			// Empty: start again at the front, keeping the array.
			tr.queue, tr.head = tr.queue[:0], 0
		}
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
				tag, _, _ := cbytes(body)
				h.q.Tag = tr.tag(tag)
				if r := rowsOf(h.q.Tag); r >= 0 {
					if h.q.Rows < 0 {
						h.q.Rows = 0
					}
					h.q.Rows += r
				}
			}
		case pendExecute:
			p := pop()
			if typ == 'C' {
				tag, _, _ := cbytes(body)
				p.q.Tag = tr.tag(tag)
				p.q.Rows = rowsOf(p.q.Tag)
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
		for head() != nil {
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
	tr.recycle(done)
}

// statementSpan starts a span for a statement when the session's trace is
// sampled, following the OTel database conventions. Statement text that may
// hold a password is not put on the span.
func (sess *session) statementSpan(q *QueryEvent) trace.Span {
	if !sess.span.IsRecording() {
		return nil
	}
	// q.Text may point into the relay buffer: the span keeps a copy.
	text := strings.Clone(q.Text)
	op := operationName(text)
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

// fatalError reports whether an ErrorResponse body ends the session
// (severity FATAL or PANIC), so the server has told the client why it closes.
func fatalError(body []byte) bool {
	for len(body) > 0 && body[0] != 0 {
		t := body[0]
		v, rest, ok := cbytes(body[1:])
		if !ok {
			return false
		}
		if t == 'V' || t == 'S' {
			return string(v) == "FATAL" || string(v) == "PANIC"
		}
		body = rest
	}
	return false
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
