package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/pgward/pgward/bpf"
	"github.com/pgward/pgward/broker"
	"github.com/pgward/pgward/exporter"
)

// ebpfState is the running eBPF tracker.
type ebpfState struct {
	tracker *Tracker
	names   map[string]string // guarded endpoint → upstream name
	exempt  *exemptCgroups    // ebpf.exempt; nil when none
}

// startEBPF loads the probes when ebpf.enabled allows. With "auto", a host
// or process that cannot run them leaves pgward on peer credentials alone,
// said once at WARN (and in /readyz and pgward_ebpf_probes_attached).
func (a *Agent) startEBPF(ctx context.Context) error {
	cfg := a.cfg
	mode := cfg.EBPF.Enabled // defaults applied: auto when unset
	if mode == "false" {
		a.log.Info("eBPF disabled by configuration: identity from peer credentials only")
		return nil
	}
	guard, names, err := guardedEndpoints(ctx, cfg)
	if err != nil {
		return err
	}
	st := &ebpfState{names: names}
	if st.exempt, err = newExemptCgroups(cfg.EBPF.Exempt); err != nil {
		return err
	}
	t, err := NewTracker(TrackerOptions{
		CgroupPath: cfg.EBPF.Cgroup,
		Enforce:    cfg.EBPF.Enforce,
		Guard:      guard,
		OnDirect:   func(r ConnectRecord) { a.directConnect(st, r) },
	}, a.log)
	if err != nil {
		if mode == "auto" && errors.Is(err, ErrEBPFUnavailable) {
			a.log.Warn("eBPF unavailable: identity from peer credentials alone; direct connects are not seen", "err", err)
			return nil
		}
		return fmt.Errorf("ebpf: %w", err)
	}
	st.tracker = t
	a.ebpf = st
	a.closers = append(a.closers, t.Close)
	a.resolver.Attester = t
	a.metrics.SetEBPFStats(func() exporter.EBPFStats {
		s := t.Stats()
		return exporter.EBPFStats{Events: s.Events, Lost: s.Lost, Probes: len(s.Attached)}
	})
	if err := t.Watch(bpf.Endpoint{Path: cfg.Listen.SocketPath()}); err != nil {
		return fmt.Errorf("ebpf: watch %s: %w", cfg.Listen.SocketPath(), err)
	}
	a.log.Info("eBPF probes attached", "programs", t.Stats().Attached, "guarded", len(guard), "enforce", cfg.EBPF.Enforce)
	return nil
}

// guardedEndpoints are every upstream's address and ebpf.guard, with host
// names resolved now.
func guardedEndpoints(ctx context.Context, cfg *Config) ([]bpf.Endpoint, map[string]string, error) {
	names := map[string]string{}
	var eps []bpf.Endpoint
	add := func(addr, upstream string) error {
		if strings.HasPrefix(addr, "/") || strings.HasPrefix(addr, "@") {
			ep, err := bpf.ParseEndpoint(addr)
			if err != nil {
				return err
			}
			eps = append(eps, ep)
			names[ep.String()] = upstream
			return nil
		}
		host, port, err := net.SplitHostPort(addr)
		if err != nil {
			return err
		}
		p, err := strconv.ParseUint(port, 10, 16)
		if err != nil {
			return fmt.Errorf("port of %q: %w", addr, err)
		}
		var ips []netip.Addr
		if ip, err := netip.ParseAddr(host); err == nil {
			ips = []netip.Addr{ip}
		} else {
			lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			ips, err = net.DefaultResolver.LookupNetIP(lctx, "ip", host)
			cancel()
			if err != nil {
				return fmt.Errorf("resolve %s to guard it: %w", host, err)
			}
		}
		for _, ip := range ips {
			if ip.IsLoopback() || ip.IsUnspecified() {
				// A local server is reached through every local address
				// (127.0.0.2, ::1, the host's own): guard the port on all.
				ip = netip.IPv6Unspecified()
			}
			ep := bpf.Endpoint{TCP: netip.AddrPortFrom(ip.Unmap(), uint16(p))}
			eps = append(eps, ep)
			names[ep.String()] = upstream
		}
		return nil
	}
	for _, name := range sortedNames(cfg.Upstreams) {
		if err := add(cfg.Upstreams[name].Address, name); err != nil {
			return nil, nil, fmt.Errorf("ebpf guard for upstream %s: %w", name, err)
		}
	}
	for _, g := range cfg.EBPF.Guard {
		if err := add(g, ""); err != nil {
			return nil, nil, fmt.Errorf("ebpf.guard: %w", err)
		}
	}
	return eps, names, nil
}

func sortedNames(m map[string]broker.UpstreamConfig) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	for i := 1; i < len(out); i++ {
		for j := i; j > 0 && out[j] < out[j-1]; j-- {
			out[j], out[j-1] = out[j-1], out[j]
		}
	}
	return out
}

// directConnect reports a connect that went around pgward.
func (a *Agent) directConnect(st *ebpfState, r ConnectRecord) {
	if p, ok := st.exempt.exempt(r.CgroupID); ok {
		a.log.Debug("connect to a guarded endpoint from an exempt cgroup (ebpf.exempt)", "cgroup", p, "pid", r.TGID, "uid", r.UID)
		return
	}
	id := broker.Identity{
		PID: int32(r.TGID), UID: r.UID, GID: r.GID, Comm: r.Comm,
		Attested: true, CgroupID: r.CgroupID, StartTime: r.StartTime, NSPID: int32(r.NSPID),
	}
	id.User = a.resolver.userName(id.UID)
	// /proc facts only if the pid still belongs to the same process.
	if sameProcess(a.resolver.ProcRoot, r.TGID, r.StartTime) {
		a.resolver.fillFromProc(&id, -1)
	}
	dest := r.Path
	if dest == "" {
		dest = netip.AddrPortFrom(r.Addr.Addr().Unmap(), r.Addr.Port()).String()
	}
	upstream := st.names[dest]
	if upstream == "" {
		// An endpoint guarded as "every address on port N".
		for ep, name := range st.names {
			if strings.HasSuffix(ep, ":"+strconv.Itoa(int(r.Addr.Port()))) {
				upstream = name
			}
		}
	}
	a.noteDirect(id, dest, upstream, r.Blocked)
	_ = a.observer.DirectConnect(context.Background(), exporter.DirectConnectEvent{
		Process: id, Dest: dest, Upstream: upstream, Blocked: r.Blocked,
	})
}

// sameProcess checks /proc/<pid>/stat's start time (clock ticks since boot)
// against the kernel record's (ns since boot).
func sameProcess(procRoot string, pid uint32, startNS uint64) bool {
	if procRoot == "" {
		procRoot = "/proc"
	}
	b, err := os.ReadFile(filepath.Join(procRoot, strconv.Itoa(int(pid)), "stat"))
	if err != nil {
		return false
	}
	ticks, ok := StatStartTime(b)
	if !ok {
		return false
	}
	const hz = 100 // USER_HZ on Linux
	got := ticks * (1e9 / hz)
	diff := int64(got) - int64(startNS)
	return diff > -1e9/hz && diff < 1e9/hz
}

// StatStartTime parses field 22 (starttime) of /proc/<pid>/stat. The comm
// field may hold spaces and parentheses, so fields are counted after the
// last ')'.
func StatStartTime(stat []byte) (uint64, bool) {
	s := string(stat)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, false
	}
	f := strings.Fields(s[i+1:])
	// After ')': field 3 is f[0]; starttime is field 22 → f[19].
	if len(f) < 20 {
		return 0, false
	}
	v, err := strconv.ParseUint(f[19], 10, 64)
	return v, err == nil
}

func (e *ebpfState) watchTCP(addr net.Addr) {
	if e == nil || e.tracker == nil {
		return
	}
	if ta, ok := addr.(*net.TCPAddr); ok {
		_ = e.tracker.Watch(bpf.Endpoint{TCP: ta.AddrPort()})
	}
}

func (e *ebpfState) run(ctx context.Context) {
	if e == nil || e.tracker == nil {
		return
	}
	go func() { _ = e.tracker.Run(ctx) }()
}
