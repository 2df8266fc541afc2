package agent

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pgward/pgward/bpf"
	"github.com/pgward/pgward/broker"
)

// ErrEBPFUnavailable is wrapped by NewTracker's error when the kernel or the
// process's privileges do not allow the probes: the agent then runs on peer
// credentials alone and says so once at WARN.
var ErrEBPFUnavailable = errors.New("eBPF unavailable")

// TrackerOptions configure NewTracker.
type TrackerOptions struct {
	// CgroupPath is where the probes attach; "" is the cgroup v2 root.
	CgroupPath string
	// ExemptTGID is the process allowed to connect to guarded endpoints;
	// 0 means this process.
	ExemptTGID uint32
	// ExemptCgroupID is a cgroup allowed to connect to guarded endpoints
	// (pgward's own unit or pod); 0 for none. 1 is refused.
	ExemptCgroupID uint64
	// Enforce refuses direct connects to guarded endpoints.
	Enforce bool
	// Guard lists the upstream databases' endpoints.
	Guard []bpf.Endpoint
	// Watch lists pgward's own listeners: their connects are recorded for
	// LookupUnix and LookupTCP.
	Watch []bpf.Endpoint
	// TableSize bounds the connect records kept for lookups; the oldest are
	// evicted first. 0 means 4096.
	TableSize int
	// MatchWait is how long a lookup waits for a connect record that has not
	// been read yet: the accept can come before the event. 0 means 50ms.
	MatchWait time.Duration
	// OnDirect is called, from Run's goroutine, for every direct connect to a
	// guarded endpoint. It must not block.
	OnDirect func(ConnectRecord)
}

func (o TrackerOptions) tableSize() int {
	if o.TableSize > 0 {
		return o.TableSize
	}
	return 4096
}

func (o TrackerOptions) matchWait() time.Duration {
	if o.MatchWait > 0 {
		return o.MatchWait
	}
	return 50 * time.Millisecond
}

// ConnectRecord is the kernel's record of one connect().
type ConnectRecord struct {
	bpf.Event
}

// apply adds the record's kernel facts to id.
func (r ConnectRecord) apply(id *broker.Identity) {
	id.Attested = true
	id.Comm = r.Comm
	id.CgroupID = r.CgroupID
	id.StartTime = r.StartTime
	id.NSPID = int32(r.NSPID)
}

// TrackerStats are the tracker's counters.
type TrackerStats struct {
	Events   uint64   // events read from the kernel
	Lost     uint64   // events the kernel dropped because the ring buffer was full
	Evicted  uint64   // connect records evicted from the table before a lookup
	Attached []string // attached programs
}

// tcpKey is a TCP connection's 4-tuple, IPv4 unmapped.
type tcpKey struct{ src, dst netip.AddrPort }

func newTCPKey(src, dst netip.AddrPort) tcpKey {
	unmap := func(a netip.AddrPort) netip.AddrPort {
		return netip.AddrPortFrom(a.Addr().Unmap().WithZone(""), a.Port())
	}
	return tcpKey{unmap(src), unmap(dst)}
}

// record is a table entry; exactly one of inode and tcp is set.
type record struct {
	rec   ConnectRecord
	inode uint64
	tcp   tcpKey
}

// Tracker reads the eBPF connect records and matches accepted connections
// to them: Unix connections exactly by the client socket's inode (through
// unix_diag), TCP connections by their 4-tuple. It never matches by "the
// latest event of that pid".
//
// NewTracker loads and attaches the probes; Run reads events until its
// context ends and then detaches them; Close detaches them too and is
// idempotent. Lookups are safe from any goroutine.
type Tracker struct {
	log    *slog.Logger
	probes *bpf.Probes
	opts   TrackerOptions
	initNS bool // pgward sees init-namespace pids: SO_PEERCRED pid == tgid

	mu      sync.Mutex
	order   *list.List // of *record, oldest first
	unix    map[uint64]*list.Element
	tcp     map[tcpKey]*list.Element
	changed chan struct{} // closed and replaced on every insert
	guarded []bpf.Endpoint

	events  atomic.Uint64
	evicted atomic.Uint64
}

var _ Attester = (*Tracker)(nil)

// NewTracker loads and attaches the probes. When eBPF cannot run here
// (privileges, kernel), the error wraps ErrEBPFUnavailable.
func NewTracker(opts TrackerOptions, log *slog.Logger) (*Tracker, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if opts.ExemptTGID == 0 {
		opts.ExemptTGID = uint32(os.Getpid())
	}
	p, err := bpf.Load(bpf.Options{
		CgroupPath:     opts.CgroupPath,
		ExemptTGID:     opts.ExemptTGID,
		ExemptCgroupID: opts.ExemptCgroupID,
		Enforce:        opts.Enforce,
	})
	if errors.Is(err, bpf.ErrPermission) || errors.Is(err, bpf.ErrUnsupported) {
		return nil, fmt.Errorf("%w: %w", ErrEBPFUnavailable, err)
	}
	if err != nil {
		return nil, fmt.Errorf("load eBPF probes: %w", err)
	}
	t := &Tracker{
		log:     log,
		probes:  p,
		opts:    opts,
		initNS:  inInitPIDNamespace(),
		order:   list.New(),
		unix:    make(map[uint64]*list.Element),
		tcp:     make(map[tcpKey]*list.Element),
		changed: make(chan struct{}),
	}
	var errs []error
	for _, ep := range opts.Watch {
		errs = append(errs, p.Watch(ep))
	}
	errs = append(errs, t.SetGuarded(opts.Guard))
	if err := errors.Join(errs...); err != nil {
		p.Close()
		return nil, fmt.Errorf("eBPF endpoints: %w", err)
	}
	for _, err := range p.Skipped() {
		log.Info("eBPF program not attached", "error", err)
	}
	log.Debug("eBPF probes attached", "programs", p.Attached())
	return t, nil
}

// inInitPIDNamespace reports whether this process's pids are the kernel's:
// /proc/self/status lists one NSpid.
func inInitPIDNamespace() bool {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "NSpid:"); ok {
			return len(strings.Fields(rest)) == 1
		}
	}
	return false
}

// Watch records connects to one more of pgward's listeners.
func (t *Tracker) Watch(ep bpf.Endpoint) error { return t.probes.Watch(ep) }

// SetGuarded replaces the guarded endpoints (on reload).
func (t *Tracker) SetGuarded(eps []bpf.Endpoint) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	var errs []error
	for _, old := range t.guarded {
		if !slices.Contains(eps, old) {
			errs = append(errs, t.probes.Unguard(old))
		}
	}
	for _, ep := range eps {
		if !slices.Contains(t.guarded, ep) {
			errs = append(errs, t.probes.Guard(ep))
		}
	}
	t.guarded = slices.Clone(eps)
	return errors.Join(errs...)
}

// SetEnforce turns the refusal of direct connects on or off.
func (t *Tracker) SetEnforce(on bool) error { return t.probes.SetEnforce(on) }

// Run reads connect records until ctx ends, then detaches the probes. It
// returns nil when ctx ended or Close was called, and an error (having
// detached the probes) when the ring buffer cannot be read.
func (t *Tracker) Run(ctx context.Context) error {
	stop := context.AfterFunc(ctx, func() { t.probes.Close() })
	defer stop()
	for {
		e, err := t.probes.Read()
		if errors.Is(err, bpf.ErrClosed) {
			return nil
		}
		if errors.Is(err, bpf.ErrBadEvent) {
			// A record we cannot decode is a bug, not a reason to stop.
			t.log.Error("eBPF event", "error", err)
			continue
		}
		if err != nil {
			t.probes.Close()
			return fmt.Errorf("eBPF events: %w", err)
		}
		t.events.Add(1)
		t.handle(ConnectRecord{e})
	}
}

func (t *Tracker) handle(r ConnectRecord) {
	if r.Guarded && r.Kind != bpf.KindTCPEstablished && t.opts.OnDirect != nil {
		t.opts.OnDirect(r)
	}
	if !r.Watched {
		return
	}
	switch {
	case r.Kind.Unix() && r.Inode != 0:
		t.insert(&record{rec: r, inode: r.Inode})
	case r.Kind == bpf.KindTCPEstablished:
		t.insert(&record{rec: r, tcp: newTCPKey(r.Src, r.Addr)})
	}
}

func (t *Tracker) insert(rec *record) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if rec.inode != 0 {
		if el, ok := t.unix[rec.inode]; ok {
			t.order.Remove(el)
		}
		t.unix[rec.inode] = t.order.PushBack(rec)
	} else {
		if el, ok := t.tcp[rec.tcp]; ok {
			t.order.Remove(el)
		}
		t.tcp[rec.tcp] = t.order.PushBack(rec)
	}
	for t.order.Len() > t.opts.tableSize() {
		t.remove(t.order.Front())
		t.evicted.Add(1)
	}
	close(t.changed)
	t.changed = make(chan struct{})
}

func (t *Tracker) remove(el *list.Element) {
	rec := t.order.Remove(el).(*record)
	if rec.inode != 0 {
		delete(t.unix, rec.inode)
	} else {
		delete(t.tcp, rec.tcp)
	}
}

// wait looks up a record, waiting up to MatchWait (or until ctx ends) for it
// to arrive. A found record is taken out of the table: one connect, one accept.
func (t *Tracker) wait(ctx context.Context, find func() (*list.Element, bool)) (ConnectRecord, bool) {
	timer := time.NewTimer(t.opts.matchWait())
	defer timer.Stop()
	for {
		t.mu.Lock()
		el, ok := find()
		changed := t.changed
		if ok {
			rec := el.Value.(*record).rec
			t.remove(el)
			t.mu.Unlock()
			return rec, true
		}
		t.mu.Unlock()
		select {
		case <-changed:
		case <-timer.C:
			return ConnectRecord{}, false
		case <-ctx.Done():
			return ConnectRecord{}, false
		}
	}
}

// LookupUnix returns the connect record of the client at the other end of
// an accepted Unix connection: the one whose socket inode is conn's peer
// inode. It waits up to MatchWait for the record.
func (t *Tracker) LookupUnix(conn *net.UnixConn) (ConnectRecord, bool) {
	r, ok, _ := t.lookupUnix(context.Background(), conn)
	return r, ok
}

func (t *Tracker) lookupUnix(ctx context.Context, conn *net.UnixConn) (ConnectRecord, bool, error) {
	_, peer, err := PeerInode(conn)
	if err != nil {
		return ConnectRecord{}, false, err
	}
	r, ok := t.wait(ctx, func() (*list.Element, bool) {
		el, ok := t.unix[peer]
		return el, ok
	})
	return r, ok, nil
}

// LookupTCP returns the connect record of an accepted TCP connection with
// local (the listener's side) and remote (the client's) addresses. It waits
// up to MatchWait for the record.
func (t *Tracker) LookupTCP(local, remote netip.AddrPort) (ConnectRecord, bool) {
	return t.lookupTCP(context.Background(), local, remote)
}

func (t *Tracker) lookupTCP(ctx context.Context, local, remote netip.AddrPort) (ConnectRecord, bool) {
	key := newTCPKey(remote, local)
	return t.wait(ctx, func() (*list.Element, bool) {
		el, ok := t.tcp[key]
		return el, ok
	})
}

// AttestUnix implements Attester: it adds the connect record of conn's
// client to id, which holds the peer credentials. A record whose ids differ
// from the peer credentials is an error: both were taken at connect().
func (t *Tracker) AttestUnix(ctx context.Context, conn *net.UnixConn, id *broker.Identity) (bool, error) {
	r, ok, err := t.lookupUnix(ctx, conn)
	if err != nil {
		// Without unix_diag there is no exact match: not attested.
		t.log.Debug("unix_diag", "error", err)
		return false, nil
	}
	if !ok {
		return false, nil
	}
	if r.UID != id.UID || r.GID != id.GID || (t.initNS && int32(r.TGID) != id.PID) {
		return false, fmt.Errorf("eBPF connect record (pid %d uid %d gid %d) contradicts the peer credentials (pid %d uid %d gid %d)",
			r.TGID, r.UID, r.GID, id.PID, id.UID, id.GID)
	}
	r.apply(id)
	return true, nil
}

// AttestTCP implements Attester: the identity of an accepted TCP connection
// comes from its connect record alone.
func (t *Tracker) AttestTCP(ctx context.Context, conn *net.TCPConn) (broker.Identity, bool, error) {
	local, err1 := netip.ParseAddrPort(conn.LocalAddr().String())
	remote, err2 := netip.ParseAddrPort(conn.RemoteAddr().String())
	if err := errors.Join(err1, err2); err != nil {
		return broker.Identity{}, false, fmt.Errorf("tcp addresses: %w", err)
	}
	r, ok := t.lookupTCP(ctx, local, remote)
	if !ok {
		return broker.Identity{}, false, nil
	}
	id := broker.Identity{PID: int32(r.TGID), UID: r.UID, GID: r.GID}
	r.apply(&id)
	return id, true, nil
}

// Stats returns the tracker's counters.
func (t *Tracker) Stats() TrackerStats {
	return TrackerStats{
		Events:   t.events.Load(),
		Lost:     t.probes.Lost(),
		Evicted:  t.evicted.Load(),
		Attached: t.probes.Attached(),
	}
}

// Close detaches the probes. It is idempotent.
func (t *Tracker) Close() error { return t.probes.Close() }
