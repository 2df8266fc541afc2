package broker

import (
	"context"
	"fmt"
	"strconv"
	"sync/atomic"
	"time"
)

// Ending a session from outside (issue 12 point 4).
//
// A revoked grant, the end of a credential lease or the end of the
// shutdown grace ends a session. Closing pgward's upstream socket alone
// does not stop the server: a statement that is running finishes and
// commits. So end, when a statement is in flight:
//
//  1. stops reading the client (nothing more is forwarded) and waits for
//     the client pump to stop;
//  2. sends the upstream a CancelRequest with the backend's real key;
//  3. goes on relaying the server's answers (the tracker completes the
//     statement from them: cancelled with 57014, or completed) until
//     nothing is in flight or limits.cancel_wait passes;
//  4. if the statement still runs, opens a fresh connection with the
//     session's credential and runs pg_terminate_backend(pid), then waits
//     limits.cancel_wait again for the backend to go;
//  5. closes the upstream; the client gets pgward's FATAL ErrorResponse
//     saying why, and the session ends with its audit record.
//
// Statement results are audited as they really ended: the server's 57014
// (or 57P01 after pg_terminate_backend) with a message naming pgward and
// the reason, or success with the command tag.

// endState is the part of a session the end path shares with run.
type endState struct {
	tr         *tracker      // set by run before relaying; under termMu
	clientDone chan struct{} // closed by run when the client pump returned; under termMu
	upDone     chan struct{} // closed by run when the upstream pump returned; under termMu
	ending     chan struct{} // closed when end has drained; nil unless end started; under termMu
	// outcome is what pgward did to the running statement: 0 nothing,
	// endCancelled (CancelRequest sent), endTerminated (pg_terminate_backend).
	outcome atomic.Int32
	// stopped: a statement was audited as cancelled or terminated by pgward.
	stopped atomic.Bool
}

const (
	endCancelled int32 = iota + 1
	endTerminated
)

// end ends the session from outside: see the comment at the top of this
// file. It does not block: the drain runs on a goroutine of its own that
// the session's run waits for. cause is for the operator
// (SessionInfo.EndCause).
func (sess *session) end(reason EndReason, code, msg, cause string) {
	sess.termOnce.Do(func() {
		sess.termMu.Lock()
		defer sess.termMu.Unlock()
		sess.reason, sess.termCode, sess.termMsg, sess.cause = reason, code, msg, cause
		if sess.connParked {
			return // the connection is in the reuse pool, no longer this session's
		}
		sess.ending = make(chan struct{})
		go sess.drain(sess.ending, sess.tr, sess.clientDone, sess.upDone)
	})
}

// drain cancels the running statement and waits for its outcome, then
// closes the upstream. tr and clientDone are nil when the relay had not
// started.
func (sess *session) drain(done chan struct{}, tr *tracker, clientDone, upDone chan struct{}) {
	defer close(done)
	defer func() {
		sess.tellOutcome()
		// A client that does not read must not hold the relay past the end.
		_ = sess.client.SetWriteDeadline(time.Now().Add(2 * time.Second))
		sess.up.conn.Close()
	}()
	if tr == nil || clientDone == nil {
		return
	}
	wait := sess.srv.state.Load().cfg.Limits.cancelWait()
	// Nothing more from the client reaches the server.
	_ = sess.client.SetReadDeadline(time.Unix(1, 0))
	select {
	case <-clientDone:
	case <-time.After(wait):
		// The client pump is stuck writing to a server that does not
		// read: cancelling the statement unblocks it.
	}
	if tr.unanswered() == 0 {
		return
	}
	reason, _, _ := sess.termination()
	sess.outcome.Store(endCancelled)
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	err := sess.ups.cancel(ctx, sess.up.pid, sess.up.secretKey)
	cancel()
	if err != nil {
		sess.log.Error("ending session: cancel request to the upstream failed", "err", err, "reason", reason)
	} else {
		sess.log.Info("ending session: cancelled the running statement upstream", "reason", reason, "backend_pid", sess.up.pid)
	}
	if tr.waitIdle(wait, upDone) {
		return
	}
	// Still running (a function that swallowed the cancel, or the cancel
	// never arrived): end the backend over a connection of pgward's own.
	sess.outcome.Store(endTerminated)
	if err := sess.terminateBackend(wait); err != nil {
		sess.log.Error("ending session: statement still running after the cancel and pg_terminate_backend failed; closing the upstream connection",
			"err", err, "reason", reason, "backend_pid", sess.up.pid)
		return
	}
	sess.log.Warn("ending session: statement ignored the cancel; terminated its backend", "reason", reason, "backend_pid", sess.up.pid)
	tr.waitIdle(wait, upDone)
}

// terminateBackend runs pg_terminate_backend on the session's backend over
// a fresh connection authenticated with the session's credential (a role
// may signal its own backends).
func (sess *session) terminateBackend(wait time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	uc, err := sess.ups.connect(ctx, sess.info.User, sess.cred, nil)
	if err != nil {
		return fmt.Errorf("connect to terminate backend %d: %w", sess.up.pid, err)
	}
	defer uc.terminate()
	return uc.simpleQuery(ctx, "SELECT pg_catalog.pg_terminate_backend("+strconv.FormatUint(uint64(sess.up.pid), 10)+")", false)
}

// awaitEnd waits for an end in progress to finish draining and reports
// whether there was one. run calls it once the client pump returned.
func (sess *session) awaitEnd() bool {
	sess.termMu.Lock()
	ending := sess.ending
	sess.termMu.Unlock()
	if ending == nil {
		return false
	}
	<-ending
	return true
}

// startRelay records what end needs from run before the relay starts.
func (sess *session) startRelay(tr *tracker, upDone chan struct{}) chan struct{} {
	sess.termMu.Lock()
	defer sess.termMu.Unlock()
	sess.tr, sess.upDone = tr, upDone
	sess.clientDone = make(chan struct{})
	return sess.clientDone
}

// endNote rewrites a statement's outcome when pgward ended it: the server
// says "canceling statement due to user request" (57014) or "terminating
// connection due to administrator command" (57P01); the audit says who did
// it and why.
func (sess *session) endNote(q *QueryEvent) {
	how := "cancelled"
	switch sess.outcome.Load() {
	case endCancelled:
	case endTerminated:
		how = "terminated the backend of"
	default:
		return
	}
	if q.Code != "57014" && q.Code != CodeAdminShutdown {
		return
	}
	sess.stopped.Store(true)
	reason, _, _ := sess.termination()
	q.Error = "pgward " + how + " this statement while ending the session (" + string(reason) + "); server: " + q.Error
}

// tellOutcome adds to the message the client gets what became of the
// statement that was running when the session was ended.
func (sess *session) tellOutcome() {
	var s string
	switch {
	case sess.outcome.Load() == 0:
		return
	case sess.stopped.Load() && sess.outcome.Load() == endTerminated:
		s = "; pgward terminated the statement that was running (it ignored the cancel request), so it did not complete"
	case sess.stopped.Load():
		s = "; pgward cancelled the statement that was running, so it did not complete"
	default:
		s = "; the statement that was running completed before the session ended"
	}
	sess.termMu.Lock()
	sess.termMsg += s
	sess.termMu.Unlock()
}

// unanswered is the number of client messages the server has not
// answered yet (statements, syncs and the messages around them).
func (t *tracker) unanswered() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.inFlight()
}

// waitIdle waits up to d for every statement in flight to be answered,
// or for the upstream to be gone (upDone closed).
func (t *tracker) waitIdle(d time.Duration, upDone chan struct{}) bool {
	deadline := time.Now().Add(d)
	for t.unanswered() > 0 {
		if time.Now().After(deadline) {
			return false
		}
		select {
		case <-upDone:
			return true
		case <-time.After(10 * time.Millisecond):
		}
	}
	return true
}
