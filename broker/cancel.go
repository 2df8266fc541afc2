package broker

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"sync"
	"time"
)

// cancelKey is what pgward hands the client in BackendKeyData: the
// upstream backend's pid (drivers compare it with pg_backend_pid()) and a
// secret minted by pgward. The upstream's real secret never leaves pgward.
type cancelKey struct {
	pid    uint32
	secret uint32
}

type cancelMap struct {
	mu sync.Mutex
	m  map[cancelKey]*session
}

func (c *cancelMap) add(pid uint32, sess *session) cancelKey {
	c.mu.Lock()
	defer c.mu.Unlock()
	for {
		var b [4]byte
		_, _ = rand.Read(b[:])
		k := cancelKey{pid: pid, secret: binary.BigEndian.Uint32(b[:])}
		if _, taken := c.m[k]; !taken {
			c.m[k] = sess
			return k
		}
	}
}

func (c *cancelMap) remove(k cancelKey) {
	c.mu.Lock()
	delete(c.m, k)
	c.mu.Unlock()
}

func (c *cancelMap) get(k cancelKey) *session {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.m[k]
}

// handleCancel forwards a CancelRequest when its key names a live session
// of the same uid; otherwise it drops it. Like a server, it never answers
// the client. A uid that sent too many wrong keys (cancelBurst, refilled at
// cancelRate per second) has its cancel requests dropped unread
// ("throttled"), so a 32-bit key cannot be guessed. Every request is
// reported once to the Observer (the session's, when the key matched),
// which audits, counts and logs it.
func (s *Server) handleCancel(ctx context.Context, pkt *startupPacket, r identityResult) {
	ev := &CancelEvent{Caller: r.id, BackendPID: pkt.cancelPID}
	drop := func(reason, cause string) {
		ev.Reason, ev.Cause = reason, cause
		s.obs.Cancel(ctx, ev)
	}
	if r.err != nil {
		ev.Err = r.err
		drop("identity", "cancel request from an unverifiable caller dropped")
		return
	}
	if !s.limiter.cancelAllowed(r.id.UID) {
		drop("throttled", fmt.Sprintf("cancel request dropped unread: too many wrong cancel keys from this uid (%d a second, burst %d)", cancelRate, cancelBurst))
		return
	}
	if len(pkt.cancelKey) != 4 {
		s.limiter.wrongCancel(r.id.UID)
		drop("unknown_key", fmt.Sprintf("cancel request with a key of the wrong length (%d bytes) dropped", len(pkt.cancelKey)))
		return
	}
	k := cancelKey{pid: pkt.cancelPID, secret: binary.BigEndian.Uint32(pkt.cancelKey)}
	sess := s.cancels.get(k)
	if sess == nil {
		s.limiter.wrongCancel(r.id.UID)
		drop("unknown_key", "cancel request with an unknown key dropped: forged or stale")
		return
	}
	ev.Session = &sess.info
	ev.RequestID = sess.info.RequestID
	if r.id.UID != sess.info.Identity.UID && r.id.UID != 0 {
		s.limiter.wrongCancel(r.id.UID)
		ev.Reason, ev.Cause = "uid_mismatch", "cancel request from another uid dropped"
		sess.obs.Cancel(ctx, ev)
		return
	}
	// Audit the decision before acting on it, as for statements: once the
	// cancel reaches the server the statement fails and the session may end
	// at once, and the cancel must not be recorded after the session's end.
	ev.Forwarded = true
	sess.obs.Cancel(ctx, ev)
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := sess.ups.cancel(cctx, sess.up.pid, sess.up.secretKey); err != nil {
		sess.log.Error("forwarding cancel request failed", "err", err, "caller_pid", r.id.PID)
	}
}
