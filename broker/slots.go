package broker

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"syscall"
	"time"
)

// Connection slots: listen.max_connections bounds every connection at once;
// within it, limits.connections_per_uid and limits.connections_per_cgroup
// bound the connections of one uid (one cgroup) that are still logging in —
// from accept until the session starts relaying (startup packet, identity,
// policy, credentials, upstream login). A caller that opens sockets and
// sends nothing therefore takes at most its share of the slots, for at most
// listen.login_timeout each, and a granted app of another uid still gets in.
//
// The uid and pid come from SO_PEERCRED at accept (Unix listener only: the
// TCP listener's callers are known only after the eBPF lookup, so they count
// against listen.max_connections alone). The cgroup comes from the resolver
// when it implements PeerCgroups, and only when the per-cgroup limit is on
// (off by default: a /proc read per connection measurably slowed accepting
// under a 10k-connection slowloris); the root cgroup ("/" or "") is never
// limited, since on hybrid hierarchies most tasks report it.

// Slot refusal reasons (metric label values of pgward_connections_refused_total).
const (
	SlotMaxConnections = "max_connections"
	SlotPerUID         = "per_uid"
	SlotPerCgroup      = "per_cgroup"
)

// PeerCgroups is an optional interface of an IdentityResolver: the cgroup
// path of a process, read cheaply at accept for connection slots. It is not
// an identity check (the process is not pinned); "" when unknown.
type PeerCgroups interface {
	PeerCgroup(pid int32) string
}

// SlotRefusal is a connection refused with 53300 for want of a slot, before
// any authentication.
type SlotRefusal struct {
	Reason string // SlotMaxConnections, SlotPerUID or SlotPerCgroup
	Limit  int    // the limit that was reached
	// Peer is the caller as SO_PEERCRED saw it (PID, UID, GID) with Cgroup;
	// zero, with PeerKnown false, on the TCP listener.
	Peer      Identity
	PeerKnown bool
}

// peerKey is who holds a login slot.
type peerKey struct {
	known  bool
	uid    uint32
	cgroup string
}

// slotTable counts the connections per uid and per cgroup still logging in.
type slotTable struct {
	mu       sync.Mutex
	byUID    map[uint32]int
	byCgroup map[string]int
}

// limitedCgroup says whether cg is limited per cgroup: never the root.
func limitedCgroup(cg string) bool { return cg != "" && cg != "/" }

// acquire takes a login slot for p, or says which limit is reached.
func (t *slotTable) acquire(p peerKey, perUID, perCgroup int) (release func(), reason string, limit int) {
	if !p.known {
		return func() {}, "", 0
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.byUID == nil {
		t.byUID, t.byCgroup = map[uint32]int{}, map[string]int{}
	}
	if perUID > 0 && t.byUID[p.uid] >= perUID {
		return nil, SlotPerUID, perUID
	}
	cg := limitedCgroup(p.cgroup)
	if cg && perCgroup > 0 && t.byCgroup[p.cgroup] >= perCgroup {
		return nil, SlotPerCgroup, perCgroup
	}
	t.byUID[p.uid]++
	if cg {
		t.byCgroup[p.cgroup]++
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			t.mu.Lock()
			defer t.mu.Unlock()
			if t.byUID[p.uid]--; t.byUID[p.uid] <= 0 {
				delete(t.byUID, p.uid)
			}
			if cg {
				if t.byCgroup[p.cgroup]--; t.byCgroup[p.cgroup] <= 0 {
					delete(t.byCgroup, p.cgroup)
				}
			}
		})
	}, "", 0
}

// loginSlots returns the number of connections of uid still logging in, for tests.
func (t *slotTable) loginSlots(uid uint32) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.byUID[uid]
}

// peerOf reads the caller's credentials of an accepted Unix connection.
func (s *Server) peerOf(c net.Conn, withCgroup bool) (Identity, bool) {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return Identity{}, false
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return Identity{}, false
	}
	var cred *syscall.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = syscall.GetsockoptUcred(int(fd), syscall.SOL_SOCKET, syscall.SO_PEERCRED)
	}); err != nil || cerr != nil || cred == nil {
		return Identity{}, false
	}
	id := Identity{PID: cred.Pid, UID: cred.Uid, GID: cred.Gid}
	if pc, ok := s.resolver.(PeerCgroups); ok && withCgroup && cred.Pid > 0 {
		id.Cgroup = pc.PeerCgroup(cred.Pid)
	}
	return id, true
}

// admitConn decides whether an accepted connection gets a slot. n is the
// number of connections open, this one included. On refusal it counts, logs
// and reports it and returns the error for answerRefusal; the caller closes c.
func (s *Server) admitConn(ctx context.Context, c net.Conn, n int64) (release func(), refusal *ClientError) {
	cfg := s.state.Load().cfg
	perCgroup := cfg.Limits.connectionsPerCgroup()
	peer, known := s.peerOf(c, perCgroup > 0)
	r := &SlotRefusal{Peer: peer, PeerKnown: known}
	if max := cfg.Listen.maxConnections(); n > int64(max) {
		r.Reason, r.Limit = SlotMaxConnections, max
	} else {
		rel, reason, limit := s.slots.acquire(peerKey{known: known, uid: peer.UID, cgroup: peer.Cgroup},
			cfg.Limits.connectionsPerUID(cfg.Listen), perCgroup)
		if reason == "" {
			return rel, nil
		}
		r.Reason, r.Limit = reason, limit
	}
	var msg, hint string
	switch r.Reason {
	case SlotMaxConnections:
		msg = fmt.Sprintf("pgward has too many connections (listen.max_connections is %d)", r.Limit)
		hint = "Try again later, or raise listen.max_connections."
	case SlotPerUID:
		msg = fmt.Sprintf("too many connections logging in from uid %d (limits.connections_per_uid is %d)", peer.UID, r.Limit)
		hint = "Finish or close the logins in progress, or raise limits.connections_per_uid."
	default:
		msg = fmt.Sprintf("too many connections logging in from cgroup %s (limits.connections_per_cgroup is %d)", peer.Cgroup, r.Limit)
		hint = "Finish or close the logins in progress, or raise limits.connections_per_cgroup."
	}
	attrs := []any{slog.String("reason", r.Reason), slog.Int("limit", r.Limit)}
	if known {
		attrs = append(attrs, slog.Uint64("uid", uint64(peer.UID)), slog.Int("pid", int(peer.PID)), slog.String("cgroup", peer.Cgroup))
	} else {
		attrs = append(attrs, slog.String("remote", remoteString(c)))
	}
	s.obs.SlotRefused(ctx, r)
	s.slotLog.log(s.log, r.Reason, peer.UID, attrs)
	return nil, refuse(CodeTooManyConnections, "", msg, hint)
}

// politeRefusals bounds the slot refusals that wait (up to a second) for
// the client's startup packet before answering, as a server does, so that
// a client still writing it gets the error rather than EPIPE. Past it a
// refusal is answered at once: a flood of refused connections holds
// neither slots nor more than this many waiting goroutines.
const politeRefusals = 64

// answerRefusal sends a slot refusal's 53300. It does not close c.
func (s *Server) answerRefusal(c net.Conn, e *ClientError) {
	if s.refusing.Add(1) <= politeRefusals {
		_ = c.SetDeadline(time.Now().Add(time.Second))
		_, _ = s.readStartup(c)
	} else {
		_ = c.SetDeadline(time.Now().Add(100 * time.Millisecond))
	}
	s.refusing.Add(-1)
	sendError(c, e)
}

// slotLogLimiter keeps a flood of refusals from flooding the log: the first
// refusal of a (reason, uid) in a second is logged at WARN, with the number
// suppressed since the last one logged.
type slotLogLimiter struct {
	mu   sync.Mutex
	last map[slotLogKey]*slotLogState
}

type slotLogKey struct {
	reason string
	uid    uint32
}

type slotLogState struct {
	at         time.Time
	suppressed int
}

func (l *slotLogLimiter) log(log *slog.Logger, reason string, uid uint32, attrs []any) {
	now := time.Now()
	l.mu.Lock()
	if l.last == nil || len(l.last) > 4096 {
		l.last = map[slotLogKey]*slotLogState{}
	}
	k := slotLogKey{reason, uid}
	st := l.last[k]
	if st == nil {
		st = &slotLogState{}
		l.last[k] = st
	}
	if !st.at.IsZero() && now.Sub(st.at) < time.Second {
		st.suppressed++
		l.mu.Unlock()
		return
	}
	suppressed := st.suppressed
	st.at, st.suppressed = now, 0
	l.mu.Unlock()
	if suppressed > 0 {
		attrs = append(attrs, slog.Int("suppressed_since_last", suppressed))
	}
	log.Warn("connection refused: no connection slot (53300)", attrs...)
}

// loginSlotKey carries the release of a connection's login slot on the
// context handle runs with; the session gives the slot back when it starts
// relaying (a relaying session is bounded by limits.sessions_per_principal).
type loginSlotKey struct{}

func withLoginSlot(ctx context.Context, release func()) context.Context {
	return context.WithValue(ctx, loginSlotKey{}, release)
}

// releaseLoginSlot gives back the login slot of the connection ctx belongs to.
func releaseLoginSlot(ctx context.Context) {
	if f, ok := ctx.Value(loginSlotKey{}).(func()); ok {
		f()
	}
}
