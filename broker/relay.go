package broker

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"
)

const relayBufSize = 32 << 10

// run relays until either side ends, then ends the session. It owns both
// connections from here on and closes them.
func (sess *session) run() {
	tr := newTracker()
	tr.verify = sess.ups == nil || !sess.ups.cfg.TrustNamedStatements
	upDone := make(chan struct{})
	clientDone := sess.startRelay(tr, upDone)
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
				reason := EndLeaseExpired
				if sess.lease.Reason != nil && sess.lease.Reason() == string(EndLeaseRevoked) {
					reason = EndLeaseRevoked
				}
				sess.end(reason, CodeAdminShutdown, "pgward ended this session: its database credential lease ended ("+string(reason)+")",
					"credential lease ended")
			case <-upDone:
			}
		}()
	}

	clientErr := sess.pumpClient(tr, upDone)
	close(clientDone)
	// An end from outside (endsession.go) stopped the client pump to cancel
	// the running statement: wait for its outcome; the client is still
	// there to be told why the session ended.
	ended := sess.awaitEnd()
	clientMu.Lock()
	clientGone = !ended
	clientMu.Unlock()
	sess.closeUpstream(tr, clientErr, upDone)

	reason, _, _ := sess.termination()
	if reason == "" {
		if clientErr == nil {
			reason = EndClientClosed
		} else if errors.Is(clientErr, errUpstreamGone) {
			reason = EndUpstreamClosed
		} else {
			reason = EndError
		}
	}
	sess.unfinished(tr)
	sess.info.EndReason = reason
	sess.termMu.Lock()
	sess.info.EndCause = sess.cause
	sess.termMu.Unlock()
	sess.info.End = time.Now()
	sess.info.Queries = tr.index
	sess.obs.End(sess.ctx)
}

var errUpstreamGone = errors.New("upstream connection closed")

// flushMessage is a Flush: it asks the server for the answers it holds.
var flushMessage = []byte{'H', 0, 0, 0, 4}

// refusedDrainTime bounds how long a refused message is read and dropped
// before the session is closed.
const refusedDrainTime = 2 * time.Second

// errWithheld stops a scan at a client Terminate that is not forwarded.
var errWithheld = errors.New("terminate withheld")

// resumeKind is what a pump's goroutine does when the event loop hands
// the pump to it (eventloop.go): the wait the inline pump could not do.
type resumeKind uint8

const (
	resumeFlush    resumeKind = iota // only send what the peer did not take
	resumeRead                       // the read ended (rerr): the end, as the goroutine relay handles it
	resumeRoom                       // wait for buffer memory (room(need))
	resumeBarrier                    // ask for the server's answers and wait, then scan on
	resumeTooLarge                   // refuse the message over limits.max_message_bytes
	resumeProcess                    // process m bytes read into a grown buffer, and read on while it lasts
	resumeCommit                     // (on the loop thread) the read's statements are staged: commit, forward, go on
)

// pumpEvent is what the loop thread tells a pump's goroutine.
type pumpEvent struct {
	end bool  // the pump ended with err
	err error // when end
}

// inlinePump is the part of a pump the event loop drives.
type inlinePump struct {
	lc, peer *loopConn // this direction's socket and the peer's; nil: no loop
	inline   bool      // running on the loop thread: nothing may block
	handler  func()
	wake     chan pumpEvent
	resume   resumeKind
	rerr     error // resumeRead
	need     int   // resumeRoom
	m        int   // resumeProcess
	more     bool  // the last read may have left bytes in the socket
	again    bool  // the socket was readable while a commit was pending
}

// handoff gives the pump to its goroutine (from the loop thread).
func (p *inlinePump) handoff(ev pumpEvent) {
	p.lc.setInline(nil)
	p.wake <- ev
}

// inlineReads bounds the reads of one socket per wake-up: a session whose
// socket never runs dry (a stream both peers keep up with) yields the loop
// thread to the others after this many, and is kicked to go on.
const inlineReads = 16

// onReadable runs on the loop thread when the pump's socket is readable:
// it reads and processes (process reports the pump's end) until the socket
// is drained or the pump must wait, which its goroutine then does. A read
// into a grown buffer (a message over relayBufSize) is processed by the
// goroutine too, which writes it from that counted buffer: the loop
// thread's writes, and what it keeps of them for a slow peer, stay within
// a standard read.
func (p *inlinePump) onReadable(rd *relayReader, process func(m int) (bool, error)) {
	if p.resume == resumeCommit {
		p.again = true // read on after the commit (commitH)
		return
	}
	for reads := 0; ; reads++ {
		if reads == inlineReads {
			p.lc.loop.kick(p.lc)
			return
		}
		m, full, rerr := rd.readInline(p.lc)
		if rerr == errWouldBlock {
			return
		}
		if rerr != nil {
			p.resume, p.rerr = resumeRead, rerr
			p.handoff(pumpEvent{})
			return
		}
		if rd.big != nil {
			p.resume, p.m = resumeProcess, m
			p.handoff(pumpEvent{})
			return
		}
		p.more = full || !p.lc.drained()
		if !p.next(process(m)) {
			return
		}
	}
}

// next says whether the inline pump reads on after a read was processed
// (end, err: process's result); if not, the pump waits for the round's
// audit write (resumeCommit), for its socket, or is handed to its
// goroutine.
func (p *inlinePump) next(end bool, err error) bool {
	switch {
	case end:
		p.handoff(pumpEvent{end: true, err: err})
		return false
	case p.resume == resumeCommit:
		return false
	case p.resume != resumeFlush || p.peer.pendingOut():
		p.handoff(pumpEvent{})
		return false
	}
	more := p.more || p.again
	p.again = false
	return more
}

// goInline gives the pump to the loop and waits until the loop hands it
// back; it flushes what the peer did not take.
func (p *inlinePump) goInline() (pumpEvent, error) {
	p.resume = resumeFlush
	p.inline = true
	p.lc.setInline(&p.handler)
	ev := <-p.wake
	p.inline = false
	if p.peer.pendingOut() {
		if err := p.peer.flush(); err != nil {
			return ev, err
		}
	}
	return ev, nil
}

// clientPump copies client → upstream, auditing each statement before it is
// forwarded. upDone is closed when the upstream pump has ended.
type clientPump struct {
	inlinePump
	sess       *session
	tr         *tracker
	upDone     <-chan struct{}
	rd         *relayReader
	fs         *frameScanner
	gone       func() bool
	terminated bool
	reusable   bool
	// A message rewritten (verify.go) is not forwarded as it is: out holds
	// what goes upstream in place of the first base pending bytes, so that
	// a read still goes in one write, audited as a whole.
	out  []byte
	base int
	// resumeTooLarge; resumeCommit (fwd, need, barrier)
	tl      *MessageTooLargeError
	fwd     int
	need    int
	barrier bool
	// stager splits the audit of a read in two on the loop thread: the
	// reads of one round are staged, then committed with one audit write
	// (eventLoop.afterRound). nil without the loop or with an observer
	// that cannot stage.
	stager  StatementStager
	commitH func()
}

// pumpClient runs the client pump until the client ends the session
// (nil), or an error ends it.
func (sess *session) pumpClient(tr *tracker, upDone <-chan struct{}) error {
	cp := &clientPump{sess: sess, tr: tr, upDone: upDone, rd: newRelayReader(sess.client, &sess.srv.budget)}
	defer cp.rd.release()
	// A wait for buffer memory ends with the session (see relayReader.room).
	cp.gone = func() bool {
		select {
		case <-upDone:
			return true
		default:
		}
		r, _, _ := sess.termination()
		return r != "" || cp.rd.closed()
	}
	cp.fs = &frameScanner{maxMsg: sess.srv.state.Load().cfg.maxMessageBytes()}
	for _, t := range []byte{'Q', 'P', 'B', 'E', 'C', 'F', 'S', 'D', 'X', 'c', 'f'} {
		cp.fs.want[t] = true
	}
	cp.reusable = sess.up.reuse != nil
	cp.fs.inspect = func(typ byte, body []byte) error {
		if typ == 'X' && cp.reusable {
			// Withheld: the upstream connection may serve another session.
			// Idle only if every message before it was answered (the
			// last one ended a request: Query, Sync, FunctionCall).
			cp.terminated = true
			switch cp.fs.prev {
			case 0, 'Q', 'S', 'F':
				sess.clientIdle = true
			}
			return errWithheld
		}
		if err := sess.frontendMessage(tr, typ, body); err != nil {
			return err
		}
		if typ == 'X' {
			cp.terminated = true
		}
		return nil
	}
	cp.lc, _ = sess.client.(*loopConn)
	cp.peer, _ = sess.up.conn.(*loopConn)
	if cp.lc == nil || cp.peer == nil {
		for {
			m, rerr := cp.rd.read()
			if end, err := cp.process(m, rerr); end {
				return err
			}
		}
	}
	cp.wake = make(chan pumpEvent, 1)
	cp.handler = func() { cp.onReadable(cp.rd, func(m int) (bool, error) { return cp.process(m, nil) }) }
	cp.stager, _ = sess.obs.(StatementStager)
	cp.commitH = func() {
		if cp.next(cp.commit()) {
			cp.handler()
		}
	}
	for {
		ev, ferr := cp.goInline()
		if ev.end {
			return ev.err
		}
		if ferr != nil {
			return errUpstreamGone
		}
		if end, err := cp.resumeWork(); end {
			return err
		}
	}
}

// resumeWork does, on the pump's goroutine, what the inline pump could not.
func (cp *clientPump) resumeWork() (bool, error) {
	switch cp.resume {
	case resumeRead:
		return cp.process(0, cp.rerr)
	case resumeRoom:
		if err := cp.rd.room(cp.need, cp.gone); err != nil {
			return true, errUpstreamGone
		}
		return cp.after(nil)
	case resumeBarrier:
		if err := cp.barrierWait(); err != nil {
			return true, err
		}
		return cp.process(1, nil)
	case resumeTooLarge:
		return true, cp.tooLarge(cp.tl, cp.fwd)
	case resumeProcess:
		end, err := cp.process(cp.m, nil)
		for !end && cp.rd.big != nil {
			m, rerr := cp.rd.read()
			end, err = cp.process(m, rerr)
		}
		return end, err
	}
	return false, nil
}

func (cp *clientPump) auditBatch() error {
	// Audit first: nothing reaches the database unaudited. The
	// statements of one read are audited together, all durable
	// before any of them is forwarded.
	var err error
	if len(cp.tr.batch) > 0 {
		err = cp.sess.audit(cp.tr.batch)
	}
	return cp.audited(err)
}

// audited ends the audit of a read; an error (the audit trail is
// unavailable) ends the session.
func (cp *clientPump) audited(err error) error {
	if err != nil {
		cp.sess.terminate(EndAuditUnavailable, CodeIOError, "pgward's audit log is unavailable, so the statement was not sent; the session is closed", "")
		return err
	}
	cp.tr.unpin()
	return nil
}

// write sends b upstream; inline, what the socket does not take waits in
// order in the peer's loopConn (sent by the goroutine, goInline).
func (p *inlinePump) write(c net.Conn, b []byte) error {
	if p.inline {
		if err := p.peer.writeInline(b); err != nil && err != errWouldBlock {
			return err
		}
		return nil
	}
	_, err := c.Write(b)
	return err
}

// forward sends the first n pending bytes (as out for the first base).
func (cp *clientPump) forward(n int) error {
	sess, rd := cp.sess, cp.rd
	var err error
	if len(cp.out) > 0 { // base may be 0: sent before the message at 0
		cp.out = append(cp.out, rd.pending()[cp.base:n]...)
		err = cp.write(sess.up.conn, cp.out)
		if cap(cp.out) > 4*relayBufSize {
			cp.out = nil
		}
		cp.out, cp.base = cp.out[:0], 0
	} else if n > 0 {
		err = cp.write(sess.up.conn, rd.pending()[:n])
	}
	if err != nil {
		return errUpstreamGone
	}
	if n > 0 {
		sess.info.BytesIn += int64(n)
		sess.live.bytesIn.Add(int64(n))
		sess.obs.Bytes(true, n)
		rd.consume(n)
	}
	return nil
}

// tooLarge refuses a client message over limits.max_message_bytes.
func (cp *clientPump) tooLarge(tl *MessageTooLargeError, fwd int) error {
	sess := cp.sess
	sess.srv.budget.tooLarge[0].Add(1)
	// Read (and drop) what the client is still sending of it,
	// for a while, so that it reads the 54000 below.
	cp.rd.drain(tl.Size-int64(len(cp.rd.pending())-fwd), refusedDrainTime)
	sess.terminate(EndMessageTooLarge, CodeProgramLimitExceeded, fmt.Sprintf(
		"pgward refused a message of %d bytes: limits.max_message_bytes is %d; the session is closed. Send smaller statements or parameters (COPY streams any size), or have the operator raise limits.max_message_bytes",
		tl.Size, tl.Limit), fmt.Sprintf("client message %q of %d bytes over limits.max_message_bytes (%d)", tl.Type, tl.Size, tl.Limit))
	return tl
}

// barrierWait: the next message depends on answers the server has not
// sent: ask for them and wait (then it is read again).
func (cp *clientPump) barrierWait() error {
	if _, err := cp.sess.up.conn.Write(flushMessage); err != nil {
		return errUpstreamGone
	}
	if !cp.tr.waitAnswered(cp.upDone) {
		return errUpstreamGone
	}
	return nil
}

// process scans, audits and forwards what was read (m bytes, then rerr).
// It reports whether the pump ended, and with what (nil: the client ended
// the session). Inline, where it would wait it sets resume and returns.
func (cp *clientPump) process(m int, rerr error) (bool, error) {
	sess, tr, rd, fs := cp.sess, cp.tr, cp.rd, cp.fs
	for m > 0 {
		fwd, need, err := fs.scan(rd.pending()[cp.base:])
		fwd += cp.base
		barrier := err == errBarrier
		rewrite := err == errRewrite
		if err == errWithheld || barrier || rewrite {
			err = nil
		}
		if tl := asTooLarge(err); tl != nil {
			if cp.inline {
				cp.resume, cp.tl, cp.fwd = resumeTooLarge, tl, fwd
				return false, nil
			}
			return true, cp.tooLarge(tl, fwd)
		}
		if err != nil {
			sess.terminate(EndProtocolError, CodeProtocolViolation, "pgward received a malformed message and closed the session",
				"malformed message from client: "+err.Error())
			return true, err
		}
		if rewrite {
			// The message at fwd goes upstream as tr.rewrite; scanning
			// goes on after it, and the read is audited as a whole
			// (a Bind and its Execute share one event).
			cp.out = append(cp.out, rd.pending()[cp.base:fwd]...)
			cp.out = append(cp.out, tr.rewrite...)
			cp.base = fwd
			if !tr.before {
				cp.base += frameSize(rd.pending()[fwd:])
			}
			tr.before = false // else the message is read again after what was sent
			if len(cp.out) > relayBufSize {
				// Bounded: audit what was read so far and send it.
				if err := cp.auditBatch(); err != nil {
					return true, err
				}
				if err := cp.forward(cp.base); err != nil {
					return true, err
				}
			}
			continue
		}
		if cp.inline && cp.stager != nil && len(tr.batch) > 0 {
			// The forward waits for the round's audit write (commit).
			sess.auditing(tr.batch)
			cp.stager.StageStatements(sess.ctx, tr.batch)
			cp.resume, cp.fwd, cp.need, cp.barrier = resumeCommit, fwd, need, barrier
			cp.lc.loop.afterRound(&cp.commitH)
			return false, nil
		}
		if err := cp.auditBatch(); err != nil {
			return true, err
		}
		switch st, err := cp.sent(fwd, need, barrier); st {
		case stepEnd:
			return true, err
		case stepWait:
			return false, nil
		case stepDone:
			return cp.after(rerr)
		}
	}
	return cp.after(rerr)
}

// step is what a pump does after a read's statements were forwarded.
type step uint8

const (
	stepDone step = iota // the read is through
	stepScan             // scan on (after a barrier)
	stepWait             // inline: resume says what to wait for
	stepEnd              // the pump ended
)

// sent forwards the first fwd pending bytes, whose statements are audited,
// and makes room for the rest of a message of need bytes (or, at a
// barrier, waits for the server's answers).
func (cp *clientPump) sent(fwd, need int, barrier bool) (step, error) {
	sess, tr, rd := cp.sess, cp.tr, cp.rd
	if err := cp.forward(fwd); err != nil {
		return stepEnd, err
	}
	if len(tr.skipped) > 0 {
		// Sent while the server discards messages until Sync.
		sess.finish(tr, tr.skipped)
		clear(tr.skipped)
		tr.skipped = tr.skipped[:0]
	}
	if !barrier {
		if !cp.terminated {
			if cp.inline && rd.mustGrow(need) {
				cp.resume, cp.need = resumeRoom, need
				return stepWait, nil
			}
			if err := rd.room(need, cp.gone); err != nil {
				return stepEnd, errUpstreamGone
			}
		}
		return stepDone, nil
	}
	if cp.inline {
		cp.resume = resumeBarrier
		return stepWait, nil
	}
	if err := cp.barrierWait(); err != nil {
		return stepEnd, err
	}
	return stepScan, nil
}

// commit (on the loop thread, after the round's events) waits for the
// staged statements' audit write, then forwards them and goes on as
// process would have.
func (cp *clientPump) commit() (bool, error) {
	cp.resume = resumeFlush
	err := cp.stager.CommitStatements(cp.sess.ctx)
	auditedText(cp.tr.batch)
	if err := cp.audited(err); err != nil {
		return true, err
	}
	switch st, err := cp.sent(cp.fwd, cp.need, cp.barrier); st {
	case stepEnd:
		return true, err
	case stepDone:
		return cp.after(nil)
	}
	return false, nil // stepWait; inline, a barrier waits (resumeBarrier)
}

// after ends the pump after a Terminate or a read that failed.
func (cp *clientPump) after(rerr error) (bool, error) {
	if cp.terminated {
		return true, nil
	}
	if rerr == nil {
		return false, nil
	}
	sess, rd, fs := cp.sess, cp.rd, cp.fs
	if errors.Is(rerr, io.EOF) {
		if rd.n > 0 || !fs.atBoundary() {
			// The client vanished in the middle of a message: what
			// was read of it is dropped, never forwarded whole.
			sess.log.Warn("client closed the connection in the middle of a message", "pending_bytes", rd.n)
		}
		if cp.reusable && rd.n == 0 && fs.atBoundary() {
			switch fs.last {
			case 0, 'Q', 'S', 'F':
				sess.clientIdle = true
			}
		}
		return true, nil
	}
	if errors.Is(rerr, net.ErrClosed) {
		return true, errUpstreamGone
	}
	return true, rerr
}

// upstreamPump copies upstream → client and completes audited statements.
type upstreamPump struct {
	inlinePump
	sess       *session
	tr         *tracker
	clientGone func() bool
	rd         *relayReader
	fs         *frameScanner
	gone       func() bool
	done       []pending
	saidWhy    bool // the server's last message was a FATAL (or PANIC) ErrorResponse
	txStatus   byte
	// out gathers what is forwarded of a read from which an answer was
	// taken out or replaced, so that it still goes in one write.
	out []byte
}

// pumpUpstream copies upstream → client and completes audited statements.
// When it ends it tells the client why if it can, at a message boundary.
func (sess *session) pumpUpstream(tr *tracker, clientGone func() bool) {
	up := &upstreamPump{sess: sess, tr: tr, clientGone: clientGone, rd: newRelayReader(sess.up.conn, &sess.srv.budget)}
	rd := up.rd
	defer rd.release()
	// A wait for buffer memory ends with the session (see relayReader.room).
	up.gone = func() bool {
		r, _, _ := sess.termination()
		return r != "" || clientGone() || sess.parking.Load() || rd.closed()
	}
	// What the server sent behind the login's ReadyForQuery, read with it.
	rd.seed(sess.up.pre)
	sess.up.pre = nil
	fs := &frameScanner{maxMsg: sess.srv.state.Load().cfg.maxMessageBytes()}
	up.fs = fs
	// ParseComplete, BindComplete, CloseComplete are whole (5 bytes) when
	// inspected: an answer to pgward's own message is taken out (verify.go).
	for _, t := range []byte{'C', 'E', 'I', 's', 'Z', 't', '1', '2', '3'} {
		fs.want[t] = true
	}
	for _, t := range []byte{'n', 'T', 'G', 'W'} {
		fs.peek[t] = true
	}
	reusable := sess.up.reuse != nil
	// A parked connection greets its next client with the server's
	// current parameters: follow them. session_authorization and
	// is_superuser changes are audited (roles.go).
	fs.want['S'] = true
	fs.inspect = func(typ byte, body []byte) error {
		switch typ {
		case 'S':
			if name, rest, ok := cbytes(body); ok {
				if val, _, ok := cbytes(rest); ok && sess.up.params[string(name)] != string(val) {
					sess.noteParam(string(name), sess.up.params[string(name)], string(val))
					sess.up.params[string(name)] = string(val)
				}
			}
			return nil
		case 'Z':
			if len(body) > 0 {
				up.txStatus = body[0]
				sess.live.txStatus.Store(uint32(body[0]))
			}
		}
		up.saidWhy = typ == 'E' && fatalError(body)
		up.done = sess.backendMessage(tr, typ, body, up.done)
		// A portal's record (verify.go) is a DataRow, read only then.
		fs.want['D'] = tr.wantRow
		if tr.cut != 0 {
			return errCut
		}
		return nil
	}
	if reusable {
		defer func() {
			// Nothing relayed yet: still idle after the startup's ReadyForQuery.
			last := fs.last == 0 || (fs.last == 'Z' && up.txStatus == 'I')
			sess.upIdle = last && fs.atBoundary() && rd.n == 0
		}()
	}
	up.lc, _ = sess.up.conn.(*loopConn)
	up.peer, _ = sess.client.(*loopConn)
	if up.lc == nil || up.peer == nil {
		for {
			m, rerr := rd.read()
			if up.process(m, rerr) {
				return
			}
		}
	}
	up.wake = make(chan pumpEvent, 1)
	up.handler = func() { up.onReadable(up.rd, func(m int) (bool, error) { return up.process(m, nil), nil }) }
	for {
		ev, ferr := up.goInline()
		if ev.end || ferr != nil {
			return
		}
		if up.resumeWork() {
			return
		}
	}
}

// resumeWork does, on the pump's goroutine, what the inline pump could not.
func (up *upstreamPump) resumeWork() bool {
	switch up.resume {
	case resumeRead:
		return up.process(0, up.rerr)
	case resumeRoom:
		return up.process(0, up.rd.room(up.need, up.gone))
	case resumeProcess:
		end := up.process(up.m, nil)
		for !end && up.rd.big != nil {
			m, rerr := up.rd.read()
			end = up.process(m, rerr)
		}
		return end
	}
	return false
}

// process forwards what was read (m bytes, then rerr) to the client and
// completes the statements answered. It reports whether the pump ended.
// Inline, where it would wait it sets resume and returns.
func (up *upstreamPump) process(m int, rerr error) bool {
	sess, tr, rd, fs := up.sess, up.tr, up.rd, up.fs
	if m > 0 {
		up.done = up.done[:0]
		fwd, need, err := fs.scan(rd.pending())
		for err == errCut {
			up.out = append(up.out, rd.pending()[:fwd]...)
			if tr.cut == cutReplace {
				up.out = append(up.out, tr.replacement...)
			}
			tr.cut = 0
			n := fwd + frameSize(rd.pending()[fwd:])
			sess.info.BytesOut += int64(n)
			sess.live.bytesOut.Add(int64(n))
			sess.obs.Bytes(false, n)
			rd.consume(n)
			fwd, need, err = fs.scan(rd.pending())
		}
		if len(up.out) > 0 {
			up.out = append(up.out, rd.pending()[:fwd]...)
			sess.info.BytesOut += int64(fwd)
			sess.live.bytesOut.Add(int64(fwd))
			sess.obs.Bytes(false, fwd)
			rd.consume(fwd)
			fwd = 0
			if werr := up.write(sess.client, up.out); werr != nil {
				sess.finish(tr, up.done)
				return true
			}
			if cap(up.out) > 4*relayBufSize {
				up.out = nil
			}
			up.out = up.out[:0]
		}
		if tl := asTooLarge(err); tl != nil {
			sess.srv.budget.tooLarge[1].Add(1)
			sess.terminate(EndMessageTooLarge, CodeConnectionFailure, fmt.Sprintf(
				"pgward ended the session: the server sent a message of %d bytes, over limits.max_message_bytes (%d)", tl.Size, tl.Limit),
				fmt.Sprintf("upstream message %q of %d bytes over limits.max_message_bytes (%d)", tl.Type, tl.Size, tl.Limit))
			rerr = err
		} else if err != nil {
			sess.terminate(EndProtocolError, CodeConnectionFailure, "pgward received a malformed message from the upstream server and closed the session",
				"malformed message from upstream: "+err.Error())
			rerr = err
		}
		if fwd > 0 {
			if werr := up.write(sess.client, rd.pending()[:fwd]); werr != nil {
				sess.finish(tr, up.done)
				return true
			}
			sess.info.BytesOut += int64(fwd)
			sess.live.bytesOut.Add(int64(fwd))
			sess.obs.Bytes(false, fwd)
			rd.consume(fwd)
		}
		sess.finish(tr, up.done)
		if rerr == nil {
			if up.inline && rd.mustGrow(need) {
				up.resume, up.need = resumeRoom, need
				return false
			}
			rerr = rd.room(need, up.gone)
		}
	}
	if rerr == nil {
		return false
	}
	if up.inline {
		up.resume, up.rerr = resumeRead, rerr
		return false
	}
	up.end(rerr)
	return true
}

// end tells the client why the relay ended, if it can, at a message
// boundary.
func (up *upstreamPump) end(rerr error) {
	sess, rd := up.sess, up.rd
	if !up.fs.atBoundary() || sess.parking.Load() {
		return
	}
	_, code, msg := sess.termination()
	// A session ended by pgward (terminate) tells the client why
	// even when its pump has already returned (it ended the
	// session, e.g. for a message over limits.max_message_bytes).
	if code == "" && up.clientGone() {
		return
	}
	if code == "" {
		if rd.n > 0 || !errors.Is(rerr, io.EOF) || !up.saidWhy {
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
}
