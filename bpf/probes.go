package bpf

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"
)

// Errors that Load wraps, so that callers can fall back to running without eBPF.
var (
	// ErrUnsupported: the kernel lacks a program type, attach type, helper or BTF.
	ErrUnsupported = errors.New("bpf: not supported by this kernel")
	// ErrPermission: the process lacks CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN or CAP_SYS_ADMIN.
	ErrPermission = errors.New("bpf: not permitted")
	// ErrClosed is returned by Read after Close.
	ErrClosed = errors.New("bpf: probes closed")
)

// Program names, as Attached reports them.
const (
	ProgConnect4         = "cgroup/connect4"
	ProgConnect6         = "cgroup/connect6"
	ProgConnectUnix      = "cgroup/connect_unix"
	ProgSysEnterConnect  = "tracepoint/syscalls/sys_enter_connect"
	ProgInetSockSetState = "tracepoint/sock/inet_sock_set_state"
)

// Options configure Load.
type Options struct {
	// CgroupPath is the cgroup v2 directory the connect programs attach to;
	// they see the tasks in it and in its descendants. "" is the cgroup v2
	// root (Cgroup2Root).
	CgroupPath string
	// ExemptTGID is the process whose connects to guarded endpoints are not
	// direct connects: pgward itself. 0 exempts no process.
	ExemptTGID uint32
	// ExemptCgroupID exempts a cgroup (pgward's own unit or pod). 0 exempts
	// none; 1 is refused, since on hybrid hierarchies most tasks report it.
	ExemptCgroupID uint64
	// Enforce refuses direct connects with ECONNREFUSED.
	Enforce bool
	// RingBufferSize is the event ring buffer's size in bytes, a power of two
	// and a multiple of the page size; 0 means 1 MiB.
	RingBufferSize uint32
}

func (o Options) validate() error {
	var errs []error
	if o.ExemptCgroupID == 1 {
		errs = append(errs, errors.New("exempt cgroup id 1 is the root cgroup, which most tasks report on hybrid hierarchies"))
	}
	if n := o.RingBufferSize; n != 0 && (n&(n-1) != 0 || n%uint32(os.Getpagesize()) != 0) {
		errs = append(errs, fmt.Errorf("ring buffer size %d is not a power of two and a multiple of the page size", n))
	}
	return errors.Join(errs...)
}

// Endpoint is a destination to guard or watch: a TCP address or a Unix path.
type Endpoint struct {
	// TCP is an address and port. An unspecified address (0.0.0.0 or ::)
	// matches every destination address on that port. IPv4 addresses also
	// match their IPv4-mapped IPv6 form.
	TCP netip.AddrPort
	// Path is a Unix socket path, as clients pass it to connect(); a leading
	// '@' names an abstract socket.
	Path string
}

// ParseEndpoint parses "ip:port", "[ip6]:port", ":port" (every address), an
// absolute Unix socket path or "@abstract".
func ParseEndpoint(s string) (Endpoint, error) {
	if strings.HasPrefix(s, "/") || strings.HasPrefix(s, "@") {
		ep := Endpoint{Path: s}
		return ep, ep.validate()
	}
	if strings.HasPrefix(s, ":") {
		s = "[::]" + s
	}
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		return Endpoint{}, fmt.Errorf("endpoint %q: want ip:port, :port, /path or @name: %w", s, err)
	}
	ep := Endpoint{TCP: ap}
	return ep, ep.validate()
}

func (e Endpoint) String() string {
	if e.Path != "" {
		return e.Path
	}
	return e.TCP.String()
}

func (e Endpoint) validate() error {
	switch {
	case e.Path != "" && e.TCP.IsValid():
		return fmt.Errorf("endpoint %s: both a path and a TCP address", e)
	case e.Path != "":
		if strings.IndexByte(e.Path, 0) >= 0 {
			return fmt.Errorf("endpoint %q: NUL in path", e.Path)
		}
		// sun_path is 108 bytes; a file system path needs its NUL.
		if limit := unixPathMax - 1; e.Path[0] != '@' && len(e.Path) > limit {
			return fmt.Errorf("endpoint %q: path longer than %d bytes", e.Path, limit)
		}
		if e.Path == "@" || len(e.Path) > unixPathMax {
			return fmt.Errorf("endpoint %q: abstract name empty or longer than %d bytes", e.Path, unixPathMax-1)
		}
	case e.TCP.IsValid():
		if e.TCP.Port() == 0 {
			return fmt.Errorf("endpoint %s: port 0", e)
		}
	default:
		return errors.New("endpoint: empty")
	}
	return nil
}

const unixPathMax = 108

func (e Endpoint) tcpKey() connectTcpKey {
	var k connectTcpKey
	if a := e.TCP.Addr(); !a.IsUnspecified() {
		k.Addr = a.Unmap().As16() // IPv4 as v4-mapped
	}
	k.Port = e.TCP.Port()
	return k
}

func (e Endpoint) unixKey() connectUnixKey {
	var k connectUnixKey
	p := e.Path
	if p[0] == '@' {
		p = "\x00" + p[1:]
	}
	for i := 0; i < len(p); i++ {
		k.Path[i] = int8(p[i])
	}
	return k
}

// Probes owns the loaded maps and programs, their links and the ring buffer
// reader. Close releases them in reverse order.
type Probes struct {
	maps      connectMaps
	progs     []*ebpf.Program
	progNames []string // parallel to progs
	links     []link.Link
	attached  []string
	skipped   []error
	rd        *ringbuf.Reader
	rec       ringbuf.Record

	mu        sync.Mutex // endpoint flags, config, late attachment, closing
	cfg       connectConfig
	spec      *ebpf.CollectionSpec
	sockState bool // inet_sock_set_state attached, or tried
	closed    bool

	closeOnce sync.Once
	closeErr  error
	lost      uint64 // Lost at Close
}

// Load loads the programs, attaches them and opens the event ring buffer.
// cgroup/connect4 and cgroup/connect6 are required; cgroup/connect_unix falls
// back to sys_enter_connect. inet_sock_set_state, which runs on every TCP
// state change of the host, is attached by the first Watch of a TCP endpoint.
// What could not be attached is in Skipped. On error nothing stays loaded, and the error
// wraps ErrUnsupported or ErrPermission when that is the cause.
func Load(opts Options) (*Probes, error) {
	spec, err := loadConnect()
	if err != nil {
		return nil, err
	}
	return load(spec, opts)
}

// load is Load with the program set spec. A set without connect_unix
// falls back to sys_enter_connect, as on a kernel that refuses it.
func load(spec *ebpf.CollectionSpec, opts Options) (_ *Probes, err error) {
	if err := opts.validate(); err != nil {
		return nil, fmt.Errorf("bpf options: %w", err)
	}
	if opts.CgroupPath == "" {
		root, err := Cgroup2Root()
		if err != nil {
			return nil, fmt.Errorf("%w: %w", ErrUnsupported, err)
		}
		opts.CgroupPath = root
	}

	if opts.RingBufferSize != 0 {
		spec.Maps[connectMapEvents].MaxEntries = opts.RingBufferSize
	}

	p := &Probes{}
	defer func() {
		if err != nil {
			p.Close()
		}
	}()

	if err := spec.LoadAndAssign(&p.maps, nil); err != nil {
		return nil, classify(fmt.Errorf("load maps: %w", err))
	}
	p.cfg = connectConfig{ExemptTgid: opts.ExemptTGID, ExemptCgroupId: opts.ExemptCgroupID}
	if opts.Enforce {
		p.cfg.Enforce = 1
	}
	if err := p.maps.Config.Put(uint32(0), p.cfg); err != nil {
		return nil, fmt.Errorf("write config: %w", err)
	}

	for _, a := range []struct{ prog, name string }{
		{connectProgConnect4, ProgConnect4},
		{connectProgConnect6, ProgConnect6},
	} {
		if err := p.attachCgroup(spec, opts.CgroupPath, a.prog, a.name); err != nil {
			return nil, err
		}
	}

	if err := p.attachUnix(spec, opts.CgroupPath); err != nil {
		p.skipped = append(p.skipped, err)
		if err := ensureTracefs(); err != nil {
			p.skipped = append(p.skipped, fmt.Errorf("%s: %w", ProgSysEnterConnect, err))
		} else if err := p.attachTracepoint(spec, connectProgSysEnterConnect, "syscalls", "sys_enter_connect", ProgSysEnterConnect); err != nil {
			p.skipped = append(p.skipped, err)
		}
	}
	p.spec = spec // for inet_sock_set_state, attached by the first Watch of a TCP endpoint

	if p.rd, err = ringbuf.NewReader(p.maps.Events); err != nil {
		return nil, classify(fmt.Errorf("open ring buffer: %w", err))
	}
	return p, nil
}

func (p *Probes) attachUnix(spec *ebpf.CollectionSpec, path string) error {
	if spec.Programs[connectProgConnectUnix] == nil {
		return fmt.Errorf("%s: %w: not in the program set", ProgConnectUnix, ErrUnsupported)
	}
	return p.attachCgroup(spec, path, connectProgConnectUnix, ProgConnectUnix)
}

// loadProgram loads one program of spec, sharing the maps already loaded.
func (p *Probes) loadProgram(spec *ebpf.CollectionSpec, prog, name string) (*ebpf.Program, error) {
	var obj struct {
		Prog *ebpf.Program `ebpf:"prog"`
	}
	one := &ebpf.CollectionSpec{
		Maps:      spec.Maps,
		Programs:  map[string]*ebpf.ProgramSpec{"prog": spec.Programs[prog]},
		Types:     spec.Types,
		Variables: spec.Variables,
	}
	err := one.LoadAndAssign(&obj, &ebpf.CollectionOptions{MapReplacements: map[string]*ebpf.Map{
		connectMapConfig:        p.maps.Config,
		connectMapEvents:        p.maps.Events,
		connectMapLost:          p.maps.Lost,
		connectMapPending:       p.maps.Pending,
		connectMapTcpEndpoints:  p.maps.TcpEndpoints,
		connectMapUnixEndpoints: p.maps.UnixEndpoints,
	}})
	if err != nil {
		return nil, classify(fmt.Errorf("load %s: %w", name, err))
	}
	p.progs = append(p.progs, obj.Prog)
	p.progNames = append(p.progNames, name)
	return obj.Prog, nil
}

func (p *Probes) attachCgroup(spec *ebpf.CollectionSpec, path, prog, name string) error {
	pr, err := p.loadProgram(spec, prog, name)
	if err != nil {
		return err
	}
	l, err := link.AttachCgroup(link.CgroupOptions{Path: path, Attach: spec.Programs[prog].AttachType, Program: pr})
	if err != nil {
		return classify(fmt.Errorf("attach %s to %s: %w", name, path, err))
	}
	p.links = append(p.links, l)
	p.attached = append(p.attached, name)
	return nil
}

func (p *Probes) attachTracepoint(spec *ebpf.CollectionSpec, prog, group, event, name string) error {
	pr, err := p.loadProgram(spec, prog, name)
	if err != nil {
		return err
	}
	l, err := link.Tracepoint(group, event, pr, nil)
	if err != nil {
		return classify(fmt.Errorf("attach %s: %w", name, err))
	}
	p.links = append(p.links, l)
	p.attached = append(p.attached, name)
	return nil
}

// classify wraps err with ErrPermission or ErrUnsupported when one of them
// is the cause.
func classify(err error) error {
	switch {
	case errors.Is(err, unix.EPERM), errors.Is(err, unix.EACCES):
		// cilium/ebpf adds a hint about RLIMIT_MEMLOCK to EPERM; since 5.11
		// BPF memory is charged to the memory cgroup and that is not the cause.
		return fmt.Errorf("%w: %w", ErrPermission, err)
	case errors.Is(err, ebpf.ErrNotSupported), errors.Is(err, unix.EINVAL),
		errors.Is(err, unix.EOPNOTSUPP), errors.Is(err, unix.ENOTSUP), errors.Is(err, unix.ENOENT):
		return fmt.Errorf("%w: %w", ErrUnsupported, err)
	}
	return err
}

// Guard adds a guarded endpoint: connects to it by any process that is not
// exempt are direct connects.
func (p *Probes) Guard(ep Endpoint) error { return p.setFlags(ep, flagGuarded, 0) }

// Unguard removes a guarded endpoint.
func (p *Probes) Unguard(ep Endpoint) error { return p.setFlags(ep, 0, flagGuarded) }

// Watch adds one of pgward's own listeners: every connect to it is recorded.
func (p *Probes) Watch(ep Endpoint) error { return p.setFlags(ep, flagWatched, 0) }

// Unwatch removes a watched endpoint.
func (p *Probes) Unwatch(ep Endpoint) error { return p.setFlags(ep, 0, flagWatched) }

func (p *Probes) setFlags(ep Endpoint, set, clear uint32) error {
	if err := ep.validate(); err != nil {
		return err
	}
	var (
		m   *ebpf.Map
		key any
	)
	if ep.Path != "" {
		m, key = p.maps.UnixEndpoints, ep.unixKey()
	} else {
		m, key = p.maps.TcpEndpoints, ep.tcpKey()
	}

	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return ErrClosed
	}
	if ep.TCP.IsValid() && set&flagWatched != 0 && !p.sockState {
		// Without it, watched TCP connects get no source port: not fatal.
		p.sockState = true
		if err := ensureTracefs(); err != nil {
			p.skipped = append(p.skipped, fmt.Errorf("%s: %w", ProgInetSockSetState, err))
		} else if err := p.attachTracepoint(p.spec, connectProgInetSockSetState, "sock", "inet_sock_set_state", ProgInetSockSetState); err != nil {
			p.skipped = append(p.skipped, err)
		}
	}
	var flags uint32
	if err := m.Lookup(key, &flags); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("look up endpoint %s: %w", ep, err)
	}
	flags = flags&^clear | set
	if flags == 0 {
		if err := m.Delete(key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("delete endpoint %s: %w", ep, err)
		}
		return nil
	}
	if err := m.Put(key, flags); err != nil {
		return fmt.Errorf("add endpoint %s: %w", ep, err)
	}
	return nil
}

// SetEnforce turns the refusal of direct connects on or off.
func (p *Probes) SetEnforce(on bool) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return ErrClosed
	}
	cfg := p.cfg
	cfg.Enforce = 0
	if on {
		cfg.Enforce = 1
	}
	return p.putConfig(cfg)
}

// SetExempt changes the exempt process and cgroup (see Options).
func (p *Probes) SetExempt(tgid uint32, cgroupID uint64) error {
	if cgroupID == 1 {
		return errors.New("bpf: refusing to exempt cgroup id 1")
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return ErrClosed
	}
	cfg := p.cfg
	cfg.ExemptTgid, cfg.ExemptCgroupId = tgid, cgroupID
	return p.putConfig(cfg)
}

func (p *Probes) putConfig(cfg connectConfig) error {
	if err := p.maps.Config.Put(uint32(0), cfg); err != nil {
		return fmt.Errorf("write config: %w", err)
	}
	p.cfg = cfg
	return nil
}

// Read blocks until the next event and returns it; after Close it returns
// ErrClosed. It must not be called concurrently.
func (p *Probes) Read() (Event, error) {
	if err := p.rd.ReadInto(&p.rec); err != nil {
		if errors.Is(err, ringbuf.ErrClosed) || errors.Is(err, os.ErrClosed) {
			return Event{}, ErrClosed
		}
		return Event{}, fmt.Errorf("read ring buffer: %w", err)
	}
	return DecodeEvent(p.rec.RawSample)
}

// Lost is the number of events dropped because the ring buffer was full.
func (p *Probes) Lost() uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return p.lost
	}
	return p.lostLocked()
}

func (p *Probes) lostLocked() uint64 {
	var perCPU []uint64
	if err := p.maps.Lost.Lookup(uint32(0), &perCPU); err != nil {
		return 0
	}
	var n uint64
	for _, v := range perCPU {
		n += v
	}
	return n
}

// Attached names the attached programs (the Prog* constants).
func (p *Probes) Attached() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.attached...)
}

// Skipped says why optional programs are not attached.
func (p *Probes) Skipped() []error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]error(nil), p.skipped...)
}

// Close detaches every program and releases every object, in reverse order
// of creation. It is idempotent.
func (p *Probes) Close() error {
	p.closeOnce.Do(func() {
		p.mu.Lock()
		defer p.mu.Unlock()
		p.closed = true
		if p.maps.Lost != nil {
			p.lost = p.lostLocked()
		}
		var errs []error
		if p.rd != nil {
			errs = append(errs, p.rd.Close())
		}
		for i := len(p.links) - 1; i >= 0; i-- {
			errs = append(errs, p.links[i].Close())
		}
		for i := len(p.progs) - 1; i >= 0; i-- {
			errs = append(errs, p.progs[i].Close())
		}
		errs = append(errs, p.maps.Close())
		p.closeErr = errors.Join(errs...)
	})
	return p.closeErr
}
