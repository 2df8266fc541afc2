package broker

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"log/slog"
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
// of the same uid; otherwise it drops it and says so at WARN. Like a
// server, it never answers the client. A uid that sent too many wrong keys
// (cancelBurst, refilled at cancelRate per second) has its cancel requests
// dropped unread ("throttled"), so a 32-bit key cannot be guessed.
func (s *Server) handleCancel(ctx context.Context, pkt *startupPacket, r identityResult) {
	ev := &CancelEvent{Caller: r.id}
	if r.err != nil {
		ev.Reason = "identity"
		s.log.Warn("cancel request from an unverifiable caller dropped", "err", r.err)
		s.obs.Cancel(ctx, ev)
		return
	}
	if !s.limiter.cancelAllowed(r.id.UID) {
		ev.Reason = "throttled"
		s.log.Warn("cancel request dropped unread: too many wrong cancel keys from this uid", "uid", r.id.UID, "pid", r.id.PID, "exe", r.id.Exe,
			"limit_per_second", cancelRate, "burst", cancelBurst)
		s.obs.Cancel(ctx, ev)
		return
	}
	if len(pkt.cancelKey) != 4 {
		s.limiter.wrongCancel(r.id.UID)
		ev.Reason = "unknown_key"
		s.log.Warn("cancel request with a key of the wrong length dropped", "uid", r.id.UID, "pid", r.id.PID, "key_len", len(pkt.cancelKey))
		s.obs.Cancel(ctx, ev)
		return
	}
	k := cancelKey{pid: pkt.cancelPID, secret: binary.BigEndian.Uint32(pkt.cancelKey)}
	sess := s.cancels.get(k)
	if sess == nil {
		s.limiter.wrongCancel(r.id.UID)
		ev.Reason = "unknown_key"
		s.log.Warn("cancel request with an unknown key dropped: forged or stale", "uid", r.id.UID, "pid", r.id.PID, "exe", r.id.Exe, "backend_pid", pkt.cancelPID)
		s.obs.Cancel(ctx, ev)
		return
	}
	ev.Session = &sess.info
	ev.RequestID = sess.info.RequestID
	if r.id.UID != sess.info.Identity.UID && r.id.UID != 0 {
		s.limiter.wrongCancel(r.id.UID)
		ev.Reason = "uid_mismatch"
		sess.log.Warn("cancel request from another uid dropped", "caller_uid", r.id.UID, "caller_pid", r.id.PID, "caller_exe", r.id.Exe)
		s.obs.Cancel(ctx, ev)
		return
	}
	// Audit the decision before acting on it, as for statements: once the
	// cancel reaches the server the statement fails and the session may end
	// at once, and the cancel must not be recorded after the session's end.
	ev.Forwarded = true
	s.obs.Cancel(ctx, ev)
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := sess.ups.cancel(cctx, sess.up.pid, sess.up.secretKey); err != nil {
		sess.log.Error("forwarding cancel request failed", "err", err, "caller_pid", r.id.PID)
		return
	}
	sess.log.LogAttrs(ctx, slog.LevelInfo, "cancel request forwarded", slog.Int("caller_pid", int(r.id.PID)))
}

// CancelKeyFor returns the cancel secret pgward handed to the client of the
// session on upstream backend pid (for tests and diagnostics).
func (s *Server) CancelKeyFor(pid uint32) (uint32, bool) {
	s.cancels.mu.Lock()
	defer s.cancels.mu.Unlock()
	for k := range s.cancels.m {
		if k.pid == pid {
			return k.secret, true
		}
	}
	return 0, false
}
