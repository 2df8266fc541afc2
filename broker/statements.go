package broker

import (
	"encoding/binary"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"
	"unsafe"
)

// The statement tracker follows, for audit, what the server will execute.
//
// The client pump reads the client's messages and audits every one that can
// make the server run code (Query, Bind, Execute, FunctionCall) before it is
// forwarded. What an Execute runs depends on Parse, Bind and Close messages
// the server may refuse (42P05: the name exists), skip (after an error the
// server ignores extended-protocol messages until Sync) or answer later (a
// pipeline). So the tracker keeps two things:
//
//   - the confirmed state: the statements and portals the server has, changed
//     only by its answers (ParseComplete, BindComplete, CloseComplete, the
//     command tags of PREPARE/DEALLOCATE/DISCARD/DECLARE/CLOSE, ReadyForQuery
//     ending a transaction), kept by the upstream pump;
//   - the queue of client messages still to be answered, in order.
//
// The client pump resolves a name from the newest message in the queue that
// touches it, else from the confirmed state. That prediction is exact when
// the message it depends on is in the same Sync segment as the one being
// read: if the earlier message fails, the server skips this one too. When it
// depends on a message of an earlier segment still unanswered, the client
// pump stops, asks the server for its pending answers (Flush) and waits for
// them before it audits and forwards the rest (a barrier): pipelines of
// self-contained segments keep flowing, and the audit never guesses.
//
// Code running inside the server (dynamic SQL in a function or DO block, a
// SQL function whose body is PREPARE) can swap a named statement with no
// message pgward sees. So, unless upstreams.<name>.trust_named_statements
// is set, a Bind of a named statement is not forwarded as it is: pgward
// sends in its place Close + Parse of a reserved statement (verifyStmt)
// with the text it audited, then the client's Bind of that one
// (verify.go). Nothing runs between the Parse and the Bind, so what the
// server plans and executes is the audited text; the answers to pgward's
// own messages are taken out of the stream the client reads. A named
// portal can be replaced the same way; an Execute of one after other code
// ran goes upstream behind a guard that fails unless the portal is still
// the one bound (verify.go).

type pendingKind uint8

const (
	pendQuery    pendingKind = iota + 1 // simple Query: ends at ReadyForQuery
	pendFunc                            // FunctionCall: ends at ReadyForQuery
	pendSync                            // Sync: its ReadyForQuery ends the segment
	pendParse                           // ParseComplete or ErrorResponse
	pendBind                            // BindComplete or ErrorResponse
	pendExecute                         // CommandComplete/EmptyQuery/PortalSuspended or ErrorResponse
	pendClose                           // CloseComplete or ErrorResponse
	pendDescribe                        // [ParameterDescription] RowDescription/NoData or ErrorResponse
)

// terminator reports whether the server answers the message with
// ReadyForQuery (it ends a segment).
func (k pendingKind) terminator() bool { return k <= pendSync }

// pending is a client message the server has not answered yet.
type pending struct {
	kind   pendingKind
	target byte   // Close, Describe: 'S' statement or 'P' portal
	id     int64  // 1, 2, 3… in the order the client sent them
	seg    int64  // the Sync segment it belongs to
	copies int64  // CopyDone/CopyFail messages the client sent before it
	name   string // the statement (Parse, Close/Describe 'S') or portal (Bind, Close/Describe 'P')
	q      *QueryEvent
	stmt   *stmtInfo   // Parse: the new statement; Describe 'S': the one described
	portal *portalInfo // Bind: the new portal
	// owner: a Bind whose event was merged into the Execute that followed it
	// in the same read; the Bind's error is reported on that event.
	owner   *QueryEvent
	effects *sqlEffects // Query, Execute: SQL-level changes to statements and portals
	// inj: a message pgward sent in the client's stream (verify.go):
	// injOwn's answer is taken out of the stream; injRefuse's answer is an
	// error replaced by refuse.
	inj    uint8
	refuse *refusal
	// record: the portal an injRecord Execute reads the identity of.
	record *portalInfo
}

// stmtInfo is a prepared statement as the server has it.
type stmtInfo struct {
	text string
	oids []uint32 // from Parse, completed by ParameterDescription (under tracker.mu)
	// plain: the text has no PREPARE, DEALLOCATE, DISCARD, DECLARE or
	// CLOSE (known once, not looked for at every Execute).
	plain bool
	// decl: the parameter types the Parse declared (0: the server's
	// choice), which a verified Bind declares again.
	decl []uint32
	// fromSQL: prepared by SQL PREPARE (text is the whole query string).
	fromSQL bool
}

// portalInfo is a portal: the statement it was bound to and the values.
type portalInfo struct {
	name     string
	stmtName string
	stmt     *stmtInfo // nil: a statement pgward does not know
	params   []Param
	buf      []byte
	// pinned: an Execute of the read being audited points at params; the
	// portal is not reused before that read was audited.
	pinned bool
	// runs: tracker.runs after its Bind or its last Execute; a later value
	// at an Execute means other statements ran in between.
	runs int64
	// The portal's record (verify.go): recordID is the id of the Execute
	// that reads it (0: not sent); created its pg_cursors.creation_time
	// (binary), valid when recorded.
	recordID int64
	created  int64
	recorded bool
}

// maxInFlight bounds the client messages awaiting an answer. Past it the
// client pump waits (with a Flush upstream) for the server to catch up, so
// a client that pipelines without reading cannot grow the queue without
// bound.
const maxInFlight = 4096

// tracker follows the statements of a session for audit. mu guards the
// queue, the confirmed state and the counters the two pumps share; it is
// never held across I/O.
type tracker struct {
	mu    sync.Mutex
	queue []pending // queue[head:] are in flight
	head  int
	free  []*QueryEvent // recycled events (steady state allocates none)

	// The confirmed state (written by the upstream pump).
	stmts   map[string]*stmtInfo
	portals map[string]*portalInfo
	dropped []*portalInfo // portals the server no longer has, to reuse after audit

	lastID   int64 // id of the last message queued
	answered int64 // every message with id ≤ answered was answered (or skipped)
	seg      int64 // the client's current segment
	// Copy-in: the server ignores Sync (and Flush) between the message that
	// started COPY FROM STDIN and the client's CopyDone/CopyFail.
	copies       int64 // CopyDone/CopyFail the client sent
	copyIgnoring int64 // Syncs sent with copies == copyIgnoring-1 are ignored; 0: none
	// skipping: the server is discarding messages after an error and no
	// Sync that ends it has been queued yet.
	skipping bool
	wake     chan struct{}

	// Client pump only.
	index   int64
	batch   []*QueryEvent // statements of the read being scanned, audited before it is forwarded
	pinned  []*portalInfo // portals an unaudited Execute points into
	spare   []*portalInfo // portals to reuse
	waitID  int64         // a barrier: wait until this message was answered
	runs    int64         // Query, FunctionCall, Bind, Execute and portal Close messages read
	verify  bool          // verified Binds of named statements (verify.go)
	rewrite []byte        // errRewrite: what is sent in place of the message read
	// before: errRewrite sends rewrite before the message read, which is
	// then read again (a portal's record, verify.go).
	before bool
	// unrecorded: named portals bound in this segment whose identity is
	// not recorded yet (verify.go).
	unrecorded []*portalInfo
	skipped    []pending         // discarded by the server: reported once audited
	tags       map[string]string // interned command tags; upstream pump only

	// Upstream pump only: the answer just inspected is taken out of the
	// stream (cutDrop) or replaced by replacement (cutReplace).
	cut         uint8
	replacement []byte
	// wantRow: the next DataRow answers a portal's record (verify.go).
	wantRow bool
}

func newTracker() *tracker {
	return &tracker{
		stmts:   map[string]*stmtInfo{},
		portals: map[string]*portalInfo{},
		tags:    map[string]string{},
		seg:     1,
		wake:    make(chan struct{}, 1),
	}
}

// errBarrier stops a scan before a message whose meaning depends on answers
// the server has not sent yet.
var errBarrier = fmt.Errorf("barrier")

// push queues a client message awaiting its answer. Called with mu held.
// While the server skips messages after an error, everything but a Sync is
// discarded by the server unanswered: its event is completed as not
// executed once audited (t.skipped).
func (t *tracker) push(p pending) {
	if t.skipping {
		if p.kind != pendSync {
			if p.kind == pendBind {
				t.drop(p.portal)
			}
			if p.q != nil {
				p.q.Success, p.q.Error = false, "not executed: the server skips messages after an error until Sync"
				t.skipped = append(t.skipped, p)
			}
			return
		}
		t.skipping = false
	}
	t.lastID++
	p.id = t.lastID
	p.seg = t.seg
	p.copies = t.copies
	if p.kind.terminator() {
		t.seg++
	}
	t.queue = append(t.queue, p)
}

func (t *tracker) inFlight() int { return len(t.queue) - t.head }

// headp is the oldest unanswered message, or nil. Called with mu held.
func (t *tracker) headp() *pending {
	if t.head == len(t.queue) {
		return nil
	}
	return &t.queue[t.head]
}

// pop removes the oldest unanswered message. Called with mu held.
func (t *tracker) pop() pending {
	p := t.queue[t.head]
	t.queue[t.head] = pending{}
	t.head++
	t.answered = p.id
	if t.head == len(t.queue) {
		// Empty: start again at the front, keeping the array.
		t.queue, t.head = t.queue[:0], 0
	}
	return p
}

// drop hands a portal the server no longer has back for reuse, once no
// unaudited statement points at it. Called with mu held.
func (t *tracker) drop(pi *portalInfo) {
	if pi != nil && len(t.dropped) < 64 {
		t.dropped = append(t.dropped, pi)
	}
}

func (t *tracker) dropPortal(name string) {
	if pi := t.portals[name]; pi != nil {
		delete(t.portals, name)
		t.drop(pi)
	}
}

func (t *tracker) dropAllPortals() {
	for name, pi := range t.portals {
		delete(t.portals, name)
		t.drop(pi)
	}
}

// unpin is called once the statements of a read were audited: their
// parameters are no longer needed, so dropped portals may be reused.
func (t *tracker) unpin() {
	for i, pi := range t.pinned {
		pi.pinned = false
		t.pinned[i] = nil
	}
	t.pinned = t.pinned[:0]
	t.mu.Lock() // recycle reads t.batch from the upstream pump
	for i := range t.batch {
		t.batch[i] = nil
	}
	t.batch = t.batch[:0]
	for i, pi := range t.dropped {
		if !pi.pinned && len(t.spare) < 16 {
			t.spare = append(t.spare, pi)
		}
		t.dropped[i] = nil
	}
	t.dropped = t.dropped[:0]
	t.mu.Unlock()
}

// recycle takes back events the observer is done with.
func (t *tracker) recycle(done []pending) {
	t.mu.Lock()
	for _, p := range done {
		// An event still being audited (an error answered earlier in the
		// pipeline made the server skip it before it was even forwarded)
		// is left to the garbage collector, not reused under the audit.
		if p.q != nil && len(t.free) < 64 && !t.unaudited(p.q) {
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

// lookupStmt says which statement the server will have under name when the
// message being read reaches it. wait > 0 means that depends on the answer
// to message wait, of an earlier segment. Called with mu held.
func (t *tracker) lookupStmt(name []byte) (si *stmtInfo, wait int64) {
	name = nameKey(name)
	for i := len(t.queue) - 1; i >= t.head; i-- {
		p := &t.queue[i]
		hit := false
		var res *stmtInfo
		switch p.kind {
		case pendParse:
			hit, res = p.name == string(name), p.stmt
		case pendClose:
			hit = p.target == 'S' && p.name == string(name)
		case pendQuery:
			// A simple Query destroys the unnamed statement; its SQL may
			// prepare or deallocate named ones.
			hit = len(name) == 0 || p.effects.touchesStmts()
		case pendExecute:
			hit = p.effects.touchesStmts()
			if hit {
				return nil, p.id // a PREPARE run through Execute: wait for its outcome
			}
		}
		if hit {
			if p.seg < t.seg || p.effects.touchesStmts() {
				return nil, p.id
			}
			return res, 0
		}
	}
	return t.stmts[string(name)], 0
}

// lookupPortal is lookupStmt for portals. Portals also end with their
// transaction, which an unanswered Sync of an earlier segment may end.
func (t *tracker) lookupPortal(name []byte) (pi *portalInfo, wait int64) {
	name = nameKey(name)
	for i := len(t.queue) - 1; i >= t.head; i-- {
		p := &t.queue[i]
		switch p.kind {
		case pendBind:
			if p.name == string(name) {
				if p.seg < t.seg {
					return nil, p.id
				}
				return p.portal, 0
			}
		case pendClose:
			if p.target == 'P' && p.name == string(name) {
				if p.seg < t.seg {
					return nil, p.id
				}
				return nil, 0
			}
		case pendExecute:
			if p.effects.touchesPortals() {
				return nil, p.id
			}
		case pendQuery, pendFunc, pendSync:
			return nil, p.id
		}
	}
	return t.portals[string(name)], 0
}

// frontendMessage records what a client message means for audit before it
// is forwarded: statements that can make the server run code get a
// QueryEvent in t.batch. errBarrier (with t.waitID set) stops the scan
// before the message; nothing was changed.
func (sess *session) frontendMessage(t *tracker, typ byte, body []byte) error {
	bad := func(what string) error { return fmt.Errorf("%w: malformed %s message", errProtocol, what) }
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.inFlight() >= maxInFlight && typ != 'X' && typ != 'H' {
		t.waitID = t.queue[t.head].id
		return errBarrier
	}
	if len(t.unrecorded) > 0 && t.recordBefore(typ, body) {
		return errRewrite
	}
	switch typ {
	case 'Q':
		text, _, ok := cbytes(body)
		if !ok {
			return bad("Query")
		}
		t.index++
		q := t.newEventLocked()
		// The text is only needed until the observer has audited it, before
		// the buffer is reused: no copy.
		q.Index, q.Text, q.Start, q.Rows = t.index, unsafe.String(unsafe.SliceData(text), len(text)), time.Now(), -1
		t.runs++
		t.push(pending{kind: pendQuery, q: q, effects: parseSQLEffects(text)})
		t.batch = append(t.batch, q)
	case 'F':
		q, err := decodeFunctionCall(t, body)
		if err != nil {
			return bad("FunctionCall")
		}
		t.runs++
		t.push(pending{kind: pendFunc, q: q})
		t.batch = append(t.batch, q)
	case 'P':
		name, rest, ok := cbytes(body)
		if !ok {
			return bad("Parse")
		}
		text, rest, ok := cbytes(rest)
		if !ok || len(rest) < 2 {
			return bad("Parse")
		}
		np := int(binary.BigEndian.Uint16(rest))
		rest = rest[2:]
		if len(rest) < 4*np {
			return bad("Parse")
		}
		if t.verify && reserved(name) {
			t.refuseMessage(pending{kind: pendParse, name: t.name(name)}, reservedRefusal)
			return errRewrite
		}
		// Drivers re-Parse the same text (the unnamed statement, every
		// time): keep what is known of it rather than allocate again.
		si, _ := t.lookupStmt(name)
		if si == nil || si.text != string(text) || !sameDeclared(si, rest[:4*np]) || si.fromSQL {
			// One allocation for the types known and those declared.
			types := make([]uint32, 2*np)
			si = &stmtInfo{text: string(text), oids: types[:np:np], decl: types[np:], plain: !mayHaveEffects(text)}
			for i := range np {
				si.oids[i] = binary.BigEndian.Uint32(rest[4*i:])
				si.decl[i] = si.oids[i]
			}
		}
		t.push(pending{kind: pendParse, name: t.name(name), stmt: si})
	case 'B':
		return sess.bind(t, body)
	case 'E':
		portal, _, ok := cbytes(body)
		if !ok {
			return bad("Execute")
		}
		if t.verify && reserved(portal) {
			t.refuseMessage(pending{kind: pendExecute, name: t.name(portal)}, reservedPortalRefusal)
			return errRewrite
		}
		pi, wait := t.lookupPortal(portal)
		if wait > 0 {
			t.waitID = wait
			return errBarrier
		}
		if t.verify && pi != nil && pi.runs != t.runs && pi.recordID > t.answered {
			// Its guard needs the record still on its way (verify.go).
			t.waitID = pi.recordID
			return errBarrier
		}
		var q *QueryEvent
		if pi != nil {
			// A Bind of this portal read together with this Execute shares
			// its event: it moves to the Execute's place in the batch.
			for i := len(t.queue) - 1; i >= t.head; i-- {
				if b := &t.queue[i]; b.kind == pendBind && b.portal == pi {
					if b.q != nil && t.unaudited(b.q) {
						q = b.q
						b.q, b.owner = nil, q
						t.unbatch(q)
					}
					break
				}
			}
		}
		t.index++
		if q == nil {
			q = t.newEventLocked()
			if pi != nil {
				q.Text, q.Statement, q.Params = pi.stmtText(), pi.stmtName, pi.params
			}
		}
		q.Index, q.Extended, q.BindOnly, q.Start, q.Rows = t.index, true, false, time.Now(), -1
		q.Portal = t.name(portal)
		t.runs++
		// stale: other statements ran since this portal's Bind (or its
		// last Execute), so code inside the server may have replaced it.
		stale := false
		if pi != nil {
			stale = pi.runs != t.runs-1
			pi.runs = t.runs
		}
		if pi != nil && !pi.pinned {
			pi.pinned = true
			t.pinned = append(t.pinned, pi)
		}
		p := pending{kind: pendExecute, q: q, name: q.Portal}
		if pi != nil && pi.stmt != nil && !pi.stmt.plain {
			p.effects = parseSQLEffects(unsafe.Slice(unsafe.StringData(pi.stmt.text), len(pi.stmt.text)))
		}
		t.batch = append(t.batch, q)
		switch {
		case !t.verify || (len(portal) == 0 && pi != nil):
			// The unnamed portal: code in the server can close it, never
			// open one of that name (verify.go).
			q.PortalUnverified = stale
			t.push(p)
		case pi == nil:
			// For the unnamed portal too: a simple Query that failed
			// before it ran (a syntax error, 25P02) leaves the server's
			// unnamed portal as it was, while pgward, which cannot tell
			// where the Query failed, forgot it; after a ROLLBACK TO the
			// portal would run with no text in the audit.
			t.refuseMessage(p, unboundPortalRefusal(q.Portal))
			return errRewrite
		case stale && !pi.recorded:
			t.refuseMessage(p, unrecordedPortalRefusal(q.Portal))
			return errRewrite
		case stale:
			t.guardedExecute(p, pi, body)
			return errRewrite
		default:
			t.push(p)
		}
	case 'C':
		if len(body) < 2 || (body[0] != 'S' && body[0] != 'P') {
			return bad("Close")
		}
		name, _, ok := cbytes(body[1:])
		if !ok {
			return bad("Close")
		}
		if t.verify && reserved(name) {
			r := reservedRefusal
			if body[0] == 'P' {
				r = reservedPortalRefusal
			}
			t.refuseMessage(pending{kind: pendClose, target: body[0], name: t.name(name)}, r)
			return errRewrite
		}
		if body[0] == 'P' {
			// Closing a portal can run code: a statement it held partly
			// run is finished (its remaining rows, AFTER triggers).
			t.runs++
		}
		t.push(pending{kind: pendClose, target: body[0], name: t.name(name)})
	case 'D':
		if len(body) < 2 || (body[0] != 'S' && body[0] != 'P') {
			return bad("Describe")
		}
		name, _, ok := cbytes(body[1:])
		if !ok {
			return bad("Describe")
		}
		p := pending{kind: pendDescribe, target: body[0]}
		if t.verify && reserved(name) {
			r := reservedRefusal
			if body[0] == 'P' {
				r = reservedPortalRefusal
			}
			t.refuseMessage(p, r)
			return errRewrite
		}
		if body[0] == 'S' {
			p.stmt, _ = t.lookupStmt(name)
		}
		t.push(p)
	case 'S':
		if t.copyIgnoring > 0 && t.copies == t.copyIgnoring-1 {
			// In copy-in mode the server ignores Sync: no answer will come.
			return nil
		}
		t.push(pending{kind: pendSync})
	case 'c', 'f':
		t.copies++
	}
	return nil
}

// bind records a Bind: the portal it creates, and its own audit event (a
// Bind plans the statement with the bound values, which can run functions).
// An Execute of the portal in the same read takes the event over.
func (sess *session) bind(t *tracker, body []byte) error {
	bad := func() error { return fmt.Errorf("%w: malformed Bind message", errProtocol) }
	portal, rest, ok := cbytes(body)
	if !ok {
		return bad()
	}
	portalRaw := body[:len(body)-len(rest)] // with its NUL
	stmtName, rest, ok := cbytes(rest)
	if !ok || len(rest) < 2 {
		return bad()
	}
	si, wait := t.lookupStmt(stmtName)
	if wait > 0 {
		t.waitID = wait
		return errBarrier
	}
	rest0 := rest // formats, values, result formats: a verified Bind keeps them
	nf := int(binary.BigEndian.Uint16(rest))
	rest = rest[2:]
	if len(rest) < 2*nf+2 {
		return bad()
	}
	formats := rest[:2*nf]
	rest = rest[2*nf:]
	np := int(binary.BigEndian.Uint16(rest))
	rest = rest[2:]
	var pi *portalInfo
	if k := len(t.spare); k > 0 {
		pi = t.spare[k-1]
		t.spare[k-1] = nil
		t.spare = t.spare[:k-1]
	} else {
		pi = &portalInfo{}
	}
	portal, stmtName = nameKey(portal), nameKey(stmtName)
	if pi.name != string(portal) {
		pi.name = string(portal)
	}
	if pi.stmtName != string(stmtName) {
		pi.stmtName = string(stmtName)
	}
	pi.stmt = si
	t.runs++
	pi.runs = t.runs
	pi.recordID, pi.created, pi.recorded = 0, 0, false
	pi.params = pi.params[:0]
	pi.buf = pi.buf[:0]
	type span struct{ off, n int }
	var offs [16]span
	spans := offs[:0]
	for i := range np {
		if len(rest) < 4 {
			return bad()
		}
		l := int(int32(binary.BigEndian.Uint32(rest)))
		rest = rest[4:]
		f := formatCode(formats, i)
		var oid uint32
		if si != nil && i < len(si.oids) {
			oid = si.oids[i]
		}
		if l < 0 {
			pi.params = append(pi.params, Param{OID: oid, Format: f})
			spans = append(spans, span{-1, 0})
			continue
		}
		if len(rest) < l {
			return bad()
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
	t.index++
	q := t.newEventLocked()
	q.Index, q.Extended, q.BindOnly, q.Start, q.Rows = t.index, true, true, time.Now(), -1
	q.Text, q.Statement, q.Portal, q.Params = pi.stmtText(), pi.stmtName, pi.name, pi.params
	pi.pinned = true
	t.pinned = append(t.pinned, pi)
	t.batch = append(t.batch, q)
	p := pending{kind: pendBind, name: pi.name, portal: pi, q: q}
	if t.verify && reserved(portal) {
		pi.stmt = nil
		t.refuseMessage(p, reservedPortalRefusal)
		return errRewrite
	}
	if t.verify && len(portal) > 0 && !t.skipping {
		t.unrecorded = append(t.unrecorded, pi)
	}
	if !t.verify || len(stmtName) == 0 {
		t.push(p)
		return nil
	}
	// A named statement: run the text audited (verify.go).
	switch {
	case reserved(stmtName):
		pi.stmt = nil
		t.refuseMessage(p, reservedRefusal)
	case si == nil:
		t.refuseMessage(p, &refusal{code: CodeInvalidSQLStatementName,
			msg:    `prepared statement "` + pi.stmtName + `" does not exist`,
			detail: "pgward binds only statements it saw prepared in this session; code running inside the server may have prepared this one."})
	case si.fromSQL:
		t.refuseMessage(p, sqlPreparedRefusal)
	default:
		t.verifiedBind(p, portalRaw, rest0)
	}
	return errRewrite
}

func (pi *portalInfo) stmtText() string {
	if pi.stmt == nil {
		return ""
	}
	return pi.stmt.text
}

// name returns a statement or portal name as the server keys it (at most
// 63 bytes); the unnamed one costs nothing.
func (t *tracker) name(b []byte) string {
	if len(b) == 0 {
		return ""
	}
	return string(nameKey(b))
}

// nameKey is the part of a protocol-level name the server keys on.
func nameKey(b []byte) []byte {
	if len(b) > maxNameLen {
		return b[:maxNameLen]
	}
	return b
}

// newEventLocked returns a cleared QueryEvent, recycled when possible.
// Called with mu held.
func (t *tracker) newEventLocked() *QueryEvent {
	if k := len(t.free); k > 0 {
		q := t.free[k-1]
		t.free[k-1] = nil
		t.free = t.free[:k-1]
		*q = QueryEvent{}
		return q
	}
	return &QueryEvent{}
}

// unaudited reports whether q is in the batch being read.
func (t *tracker) unaudited(q *QueryEvent) bool {
	for _, b := range t.batch {
		if b == q {
			return true
		}
	}
	return false
}

// unbatch removes q from the batch, keeping the order of the rest.
func (t *tracker) unbatch(q *QueryEvent) {
	for i, b := range t.batch {
		if b == q {
			copy(t.batch[i:], t.batch[i+1:])
			t.batch[len(t.batch)-1] = nil
			t.batch = t.batch[:len(t.batch)-1]
			return
		}
	}
}

// decodeFunctionCall makes the audit event of a FunctionCall: the
// function's oid and its arguments, decoded per format code like bound
// parameters. Values point into body, valid until it is forwarded.
func decodeFunctionCall(t *tracker, body []byte) (*QueryEvent, error) {
	if len(body) < 6 {
		return nil, errProtocol
	}
	oid := binary.BigEndian.Uint32(body)
	rest := body[4:]
	nf := int(binary.BigEndian.Uint16(rest))
	rest = rest[2:]
	if len(rest) < 2*nf+2 {
		return nil, errProtocol
	}
	formats := rest[:2*nf]
	rest = rest[2*nf:]
	na := int(binary.BigEndian.Uint16(rest))
	rest = rest[2:]
	params := make([]Param, 0, min(na, 64))
	for i := range na {
		if len(rest) < 4 {
			return nil, errProtocol
		}
		l := int(int32(binary.BigEndian.Uint32(rest)))
		rest = rest[4:]
		f := formatCode(formats, i)
		if l < 0 {
			params = append(params, Param{Format: f})
			continue
		}
		if len(rest) < l {
			return nil, errProtocol
		}
		params = append(params, Param{Format: f, Value: rest[:l:l]})
		rest = rest[l:]
	}
	if len(rest) < 2 {
		return nil, errProtocol
	}
	t.index++
	q := t.newEventLocked()
	q.Index, q.Start, q.Rows = t.index, time.Now(), -1
	q.Text = "<function call oid " + strconv.FormatUint(uint64(oid), 10) + ">"
	q.FunctionOID = oid
	q.Params = params
	return q, nil
}

// formatCode is the format of value i under a Bind's or FunctionCall's
// format codes (2 bytes each): none means text for all, one applies to all.
func formatCode(formats []byte, i int) int16 {
	switch n := len(formats) / 2; {
	case n == 1:
		return int16(binary.BigEndian.Uint16(formats))
	case n > i:
		return int16(binary.BigEndian.Uint16(formats[2*i:]))
	}
	return 0
}

// sameDeclared reports whether the parameter types a Parse declares (raw,
// 4 bytes each) agree with what is known of si: each declared type (0 is
// "let the server choose") equals the known one. Called with mu held.
func sameDeclared(si *stmtInfo, declared []byte) bool {
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

// backendMessage moves the tracker on a server message and appends the
// statements it completed to done.
func (sess *session) backendMessage(t *tracker, typ byte, body []byte, done []pending) []pending {
	t.mu.Lock()
	defer t.mu.Unlock()
	before := t.answered
	defer func() {
		h := t.headp()
		t.wantRow = h != nil && h.inj == injRecord
		if t.answered != before {
			select {
			case t.wake <- struct{}{}:
			default:
			}
		}
	}()
	h := t.headp()
	switch typ {
	case '1': // ParseComplete
		if h != nil && h.kind == pendParse {
			p := t.pop()
			if p.inj != 0 {
				t.cut = cutDrop
				break
			}
			t.stmts[p.name] = p.stmt
		}
	case '2': // BindComplete
		if h != nil && h.kind == pendBind {
			p := t.pop()
			if p.inj != 0 {
				t.cut = cutDrop
				break
			}
			t.dropPortal(p.name)
			t.portals[p.name] = p.portal
			if p.q != nil {
				p.q.Success = true
				done = append(done, p)
			}
		}
	case '3': // CloseComplete
		if h != nil && h.kind == pendClose {
			p := t.pop()
			if p.inj != 0 {
				t.cut = cutDrop
				break
			}
			if p.target == 'S' {
				delete(t.stmts, p.name)
			} else {
				t.dropPortal(p.name)
			}
		}
	case 'D': // DataRow: read only when it answers a record (verify.go)
		if h != nil && h.inj == injRecord {
			recordRow(h.record, body)
			t.cut = cutDrop
		}
	case 't': // ParameterDescription
		if h != nil && h.kind == pendDescribe && h.stmt != nil && len(body) >= 2 {
			np := int(binary.BigEndian.Uint16(body))
			if len(body) >= 2+4*np {
				oids := make([]uint32, np)
				for i := range np {
					oids[i] = binary.BigEndian.Uint32(body[2+4*i:])
				}
				h.stmt.oids = oids
			}
		}
	case 'T', 'n': // RowDescription, NoData
		if h != nil && h.kind == pendDescribe {
			t.pop()
		}
	case 'G', 'W': // CopyInResponse, CopyBothResponse
		if h != nil && (h.kind == pendQuery || h.kind == pendExecute) {
			t.copyIn()
		}
	case 'C', 'I', 's':
		if h == nil {
			break
		}
		switch h.kind {
		case pendQuery:
			if typ == 'C' {
				tag, _, _ := cbytes(body)
				h.q.Tag = t.tag(tag)
				if r := rowsOf(h.q.Tag); r >= 0 {
					if h.q.Rows < 0 {
						h.q.Rows = 0
					}
					h.q.Rows += r
				}
				t.apply(h.effects, h.q.Tag)
			}
		case pendExecute:
			p := t.pop()
			if p.inj != 0 {
				// The guard passed (verify.go).
				t.cut = cutDrop
				break
			}
			switch typ {
			case 'C':
				tag, _, _ := cbytes(body)
				p.q.Tag = t.tag(tag)
				p.q.Rows = rowsOf(p.q.Tag)
				t.apply(p.effects, p.q.Tag)
			case 's':
				p.q.Tag = "suspended"
			}
			p.q.Success = true
			done = append(done, p)
		}
	case 'E':
		if h == nil {
			break
		}
		code, msg := errorFields(body)
		switch h.kind {
		case pendQuery, pendFunc:
			// The rest of the query string is discarded; ReadyForQuery follows.
			h.q.Code, h.q.Error = code, msg
		case pendSync:
			// An error at Sync (the implicit transaction's commit failed).
		default:
			// An extended-protocol message failed: the server skips every
			// message up to the next Sync.
			p := t.pop()
			if p.inj == injRefuse {
				// pgward's stand-in failed as it must: the client reads
				// pgward's refusal in its place.
				code, msg = p.refuse.code, p.refuse.msg
				t.cut, t.replacement = cutReplace, p.refuse.encode(t.replacement[:0])
			}
			guardFailed := p.inj == injGuard && code == codeDivisionByZero
			for p.inj == injOwn || p.inj == injGuard || p.inj == injRecord {
				// pgward's own Close or Parse failed (the audited text no
				// longer parses, say), or a portal's guard did: the error
				// stands in the place of the client's message it preceded.
				if h := t.headp(); h == nil || h.kind == pendSync {
					break
				}
				p = t.pop()
			}
			if guardFailed && p.inj == 0 && p.kind == pendExecute {
				// The portal is not the one bound: the client reads why.
				r := portalRefusal(p.name)
				code, msg = r.code, r.msg
				t.cut, t.replacement = cutReplace, r.encode(t.replacement[:0])
			}
			switch {
			case p.q != nil:
				p.q.Code, p.q.Error = code, msg
				done = append(done, p)
			case p.owner != nil:
				p.owner.Code, p.owner.Error = code, msg
			}
			if p.kind == pendBind {
				t.drop(p.portal)
			}
			for h := t.headp(); h != nil && h.kind != pendSync; h = t.headp() {
				done = t.skip(done)
			}
			// No Sync queued yet: what the client sends until its Sync is
			// discarded too.
			t.skipping = t.headp() == nil
		}
	case 'Z':
		status := byte(0)
		if len(body) > 0 {
			status = body[0]
		}
		for h := t.headp(); h != nil; h = t.headp() {
			if !h.kind.terminator() {
				// No answer came for it before ReadyForQuery.
				done = t.skip(done)
				continue
			}
			p := t.pop()
			if p.kind == pendQuery {
				// A simple Query destroys the unnamed statement and portal.
				delete(t.stmts, "")
				t.dropPortal("")
			}
			if p.q != nil {
				p.q.Success = p.q.Code == ""
				done = append(done, p)
			}
			break
		}
		if status == 'I' {
			// Portals end with their transaction.
			t.dropAllPortals()
		}
	}
	return done
}

// skip pops a message the server did not execute. Called with mu held.
func (t *tracker) skip(done []pending) []pending {
	p := t.pop()
	if p.kind == pendBind {
		t.drop(p.portal)
	}
	if p.q != nil {
		if p.q.Code == "" {
			p.q.Error = "not executed: an earlier message in the pipeline failed"
		}
		p.q.Success = false
		done = append(done, p)
	}
	return done
}

// copyIn: the statement at the head started COPY FROM STDIN. The Syncs the
// client sent after it and before its next CopyDone or CopyFail get no
// answer: the server ignores Sync in copy-in mode. Called with mu held.
func (t *tracker) copyIn() {
	hc := t.queue[t.head].copies
	kept := t.queue[:t.head+1]
	for i := t.head + 1; i < len(t.queue); i++ {
		if p := t.queue[i]; p.kind != pendSync || p.copies != hc {
			kept = append(kept, p)
		}
	}
	for i := len(kept); i < len(t.queue); i++ {
		t.queue[i] = pending{}
	}
	t.queue = kept
	if t.copies == hc {
		t.copyIgnoring = hc + 1
	}
}

// waitAnswered waits until the message t.waitID was answered, or the
// upstream pump ended (false).
func (t *tracker) waitAnswered(upDone <-chan struct{}) bool {
	for {
		t.mu.Lock()
		ok := t.answered >= t.waitID
		t.mu.Unlock()
		if ok {
			t.waitID = 0
			return true
		}
		select {
		case <-t.wake:
		case <-upDone:
			return false
		}
	}
}

// audit hands the statements of one read to the observer before they are
// forwarded. The text of a simple Query points into the relay buffer, so it
// is cleared once the observer has seen it.
func (sess *session) audit(events []*QueryEvent) error {
	sess.auditing(events)
	err := sess.obs.Statements(sess.ctx, events)
	auditedText(events)
	return err
}

// auditing completes the statements of a read before they are audited.
func (sess *session) auditing(events []*QueryEvent) {
	for _, q := range events {
		q.RoleChange = roleChange(q.Text)
	}
	sess.live.began(events)
}

// auditedText drops what the tracker no longer needs of audited
// statements: a simple Query's text.
func auditedText(events []*QueryEvent) {
	for _, q := range events {
		if !q.Extended {
			q.Text = ""
		}
	}
}

// unfinished reports the statements the session ended before the server
// answered, as failed.
func (sess *session) unfinished(tr *tracker) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	for _, p := range tr.queue[tr.head:] {
		if p.q != nil {
			if p.q.Code == "" {
				p.q.Code, p.q.Error = CodeConnectionFailure, "session ended before the statement completed"
			} else {
				// The server said why (57P01 after pg_terminate_backend).
				sess.endNote(p.q)
			}
			p.q.Success = false
			p.q.Duration = time.Since(p.q.Start)
			sess.obs.Result(sess.ctx, p.q)
		}
	}
	tr.queue, tr.head = nil, 0
}

// finish reports completed statements.
func (sess *session) finish(tr *tracker, done []pending) {
	now := time.Now()
	for i, p := range done {
		p.q.Duration = now.Sub(p.q.Start)
		if !p.q.Success {
			sess.endNote(p.q)
		}
		if i == len(done)-1 {
			p.q.ServerRole = sess.takeRoleReport()
		}
		sess.obs.Result(sess.ctx, p.q)
	}
	tr.recycle(done)
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
