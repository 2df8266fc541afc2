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

// pumpClient copies client → upstream, auditing each statement before it is
// forwarded. It returns nil when the client ended the session normally.
// upDone is closed when the upstream pump has ended.
func (sess *session) pumpClient(tr *tracker, upDone <-chan struct{}) error {
	rd := newRelayReader(sess.client, &sess.srv.budget)
	defer rd.release()
	// A wait for buffer memory ends with the session (see relayReader.room).
	gone := func() bool {
		select {
		case <-upDone:
			return true
		default:
		}
		r, _, _ := sess.termination()
		return r != "" || rd.closed()
	}
	fs := &frameScanner{maxMsg: sess.srv.state.Load().cfg.maxMessageBytes()}
	for _, t := range []byte{'Q', 'P', 'B', 'E', 'C', 'F', 'S', 'D', 'X', 'c', 'f'} {
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
		if err := sess.frontendMessage(tr, typ, body); err != nil {
			return err
		}
		if typ == 'X' {
			terminated = true
		}
		return nil
	}
	// A message rewritten (verify.go) is not forwarded as it is: out holds
	// what goes upstream in place of the first base pending bytes, so that
	// a read still goes in one write, audited as a whole.
	var out []byte
	base := 0
	auditBatch := func() error {
		// Audit first: nothing reaches the database unaudited. The
		// statements of one read are audited together, all durable
		// before any of them is forwarded.
		if len(tr.batch) > 0 {
			if err := sess.audit(tr.batch); err != nil {
				sess.terminate(EndAuditUnavailable, CodeIOError, "pgward's audit log is unavailable, so the statement was not sent; the session is closed", "")
				return err
			}
		}
		tr.unpin()
		return nil
	}
	// forward sends the first n pending bytes (as out for the first base).
	forward := func(n int) error {
		var err error
		if len(out) > 0 { // base may be 0: sent before the message at 0
			out = append(out, rd.pending()[base:n]...)
			_, err = sess.up.conn.Write(out)
			if cap(out) > 4*relayBufSize {
				out = nil
			}
			out, base = out[:0], 0
		} else if n > 0 {
			_, err = sess.up.conn.Write(rd.pending()[:n])
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
	for {
		m, rerr := rd.read()
		for m > 0 {
			fwd, need, err := fs.scan(rd.pending()[base:])
			fwd += base
			barrier := err == errBarrier
			rewrite := err == errRewrite
			if err == errWithheld || barrier || rewrite {
				err = nil
			}
			if tl := asTooLarge(err); tl != nil {
				sess.srv.budget.tooLarge[0].Add(1)
				// Read (and drop) what the client is still sending of it,
				// for a while, so that it reads the 54000 below.
				rd.drain(tl.Size-int64(len(rd.pending())-fwd), refusedDrainTime)
				sess.terminate(EndMessageTooLarge, CodeProgramLimitExceeded, fmt.Sprintf(
					"pgward refused a message of %d bytes: limits.max_message_bytes is %d; the session is closed. Send smaller statements or parameters (COPY streams any size), or have the operator raise limits.max_message_bytes",
					tl.Size, tl.Limit), fmt.Sprintf("client message %q of %d bytes over limits.max_message_bytes (%d)", tl.Type, tl.Size, tl.Limit))
				return err
			}
			if err != nil {
				sess.terminate(EndProtocolError, CodeProtocolViolation, "pgward received a malformed message and closed the session",
					"malformed message from client: "+err.Error())
				return err
			}
			if rewrite {
				// The message at fwd goes upstream as tr.rewrite; scanning
				// goes on after it, and the read is audited as a whole
				// (a Bind and its Execute share one event).
				out = append(out, rd.pending()[base:fwd]...)
				out = append(out, tr.rewrite...)
				base = fwd
				if !tr.before {
					base += frameSize(rd.pending()[fwd:])
				}
				tr.before = false // else the message is read again after what was sent
				if len(out) > relayBufSize {
					// Bounded: audit what was read so far and send it.
					if err := auditBatch(); err != nil {
						return err
					}
					if err := forward(base); err != nil {
						return err
					}
				}
				continue
			}
			if err := auditBatch(); err != nil {
				return err
			}
			if err := forward(fwd); err != nil {
				return err
			}
			if len(tr.skipped) > 0 {
				// Sent while the server discards messages until Sync.
				sess.finish(tr, tr.skipped)
				clear(tr.skipped)
				tr.skipped = tr.skipped[:0]
			}
			if !barrier {
				if !terminated {
					if err := rd.room(need, gone); err != nil {
						return errUpstreamGone
					}
				}
				break
			}
			// The next message depends on answers the server has not sent:
			// ask for them and wait, then read it again.
			if _, err := sess.up.conn.Write(flushMessage); err != nil {
				return errUpstreamGone
			}
			if !tr.waitAnswered(upDone) {
				return errUpstreamGone
			}
		}
		if terminated {
			return nil
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

// pumpUpstream copies upstream → client and completes audited statements.
// When it ends it tells the client why if it can, at a message boundary.
func (sess *session) pumpUpstream(tr *tracker, clientGone func() bool) {
	rd := newRelayReader(sess.up.conn, &sess.srv.budget)
	defer rd.release()
	// A wait for buffer memory ends with the session (see relayReader.room).
	gone := func() bool {
		r, _, _ := sess.termination()
		return r != "" || clientGone() || sess.parking.Load() || rd.closed()
	}
	// What the server sent behind the login's ReadyForQuery, read with it.
	rd.seed(sess.up.pre)
	sess.up.pre = nil
	fs := &frameScanner{maxMsg: sess.srv.state.Load().cfg.maxMessageBytes()}
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
	var done []pending
	saidWhy := false // the server's last message was a FATAL (or PANIC) ErrorResponse
	var txStatus byte
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
				txStatus = body[0]
				sess.live.txStatus.Store(uint32(body[0]))
			}
		}
		saidWhy = typ == 'E' && fatalError(body)
		done = sess.backendMessage(tr, typ, body, done)
		// A portal's record (verify.go) is a DataRow, read only then.
		fs.want['D'] = tr.wantRow
		if tr.cut != 0 {
			return errCut
		}
		return nil
	}
	// out gathers what is forwarded of a read from which an answer was
	// taken out or replaced, so that it still goes in one write.
	var out []byte
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
			for err == errCut {
				out = append(out, rd.pending()[:fwd]...)
				if tr.cut == cutReplace {
					out = append(out, tr.replacement...)
				}
				tr.cut = 0
				n := fwd + frameSize(rd.pending()[fwd:])
				sess.info.BytesOut += int64(n)
				sess.live.bytesOut.Add(int64(n))
				sess.obs.Bytes(false, n)
				rd.consume(n)
				fwd, need, err = fs.scan(rd.pending())
			}
			if len(out) > 0 {
				out = append(out, rd.pending()[:fwd]...)
				sess.info.BytesOut += int64(fwd)
				sess.live.bytesOut.Add(int64(fwd))
				sess.obs.Bytes(false, fwd)
				rd.consume(fwd)
				fwd = 0
				if _, werr := sess.client.Write(out); werr != nil {
					sess.finish(tr, done)
					return
				}
				if cap(out) > 4*relayBufSize {
					out = nil
				}
				out = out[:0]
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
				if _, werr := sess.client.Write(rd.pending()[:fwd]); werr != nil {
					sess.finish(tr, done)
					return
				}
				sess.info.BytesOut += int64(fwd)
				sess.live.bytesOut.Add(int64(fwd))
				sess.obs.Bytes(false, fwd)
				rd.consume(fwd)
			}
			sess.finish(tr, done)
			if rerr == nil {
				rerr = rd.room(need, gone)
			}
		}
		if rerr != nil {
			if !fs.atBoundary() || sess.parking.Load() {
				return
			}
			_, code, msg := sess.termination()
			// A session ended by pgward (terminate) tells the client why
			// even when its pump has already returned (it ended the
			// session, e.g. for a message over limits.max_message_bytes).
			if code == "" && clientGone() {
				return
			}
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
