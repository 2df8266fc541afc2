package bpf

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
)

// Kind says which program recorded an event.
type Kind uint32

// Event kinds.
const (
	KindConnect4       Kind = 1 // cgroup/connect4
	KindConnect6       Kind = 2 // cgroup/connect6
	KindConnectUnix    Kind = 3 // cgroup/connect_unix
	KindConnectUnixTP  Kind = 4 // tracepoint syscalls/sys_enter_connect (observe only)
	KindTCPEstablished Kind = 5 // a recorded TCP connect reached ESTABLISHED: Src is known
)

func (k Kind) String() string {
	switch k {
	case KindConnect4:
		return "connect4"
	case KindConnect6:
		return "connect6"
	case KindConnectUnix:
		return "connect_unix"
	case KindConnectUnixTP:
		return "sys_enter_connect"
	case KindTCPEstablished:
		return "tcp_established"
	}
	return "kind(" + strconv.FormatUint(uint64(k), 10) + ")"
}

// Unix reports whether the event is a Unix socket connect.
func (k Kind) Unix() bool { return k == KindConnectUnix || k == KindConnectUnixTP }

// Event is one connect seen by the kernel. Identity fields describe the
// connecting task at connect() time, read in the kernel: the process may be
// gone by the time the event is read.
type Event struct {
	Kind      Kind
	TGID      uint32 // process id (init pid namespace)
	PID       uint32 // thread id (init pid namespace)
	UID, GID  uint32 // effective ids, as SO_PEERCRED reports them
	Comm      string // the connecting thread's comm
	CgroupID  uint64 // cgroup v2 id (1 for most tasks on hybrid hierarchies)
	StartTime uint64 // the process's start time, ns since boot (CLOCK_BOOTTIME)
	NSPID     uint32 // the process id in its own (innermost) pid namespace
	Inode     uint64 // the connecting socket's inode (0 if unknown)
	Time      uint64 // when the event was recorded, ns since boot (CLOCK_BOOTTIME)
	Family    uint16 // AF_INET, AF_INET6 or AF_UNIX, as given to connect()

	Addr netip.AddrPort // TCP destination; IPv4 unmapped for AF_INET
	Src  netip.AddrPort // TCP source, KindTCPEstablished only
	Path string         // Unix socket path; abstract names start with '@'

	Guarded bool // the destination is a guarded endpoint and the caller is not exempt: a direct connect
	Watched bool // the destination is one of pgward's own listeners
	Blocked bool // the connect was refused
}

// Address families, as in the kernel.
const (
	afUnix  = 1
	afInet  = 2
	afInet6 = 10
)

// Event flags, as in connect.c.
const (
	flagGuarded = 1 << 0
	flagWatched = 1 << 1
	flagBlocked = 1 << 2
)

// EventSize is the size of a raw event record.
const EventSize = 232

// ErrBadEvent is wrapped by DecodeEvent's (and so Read's) errors for a
// record it cannot decode.
var ErrBadEvent = errors.New("bpf: malformed event record")

// DecodeEvent decodes one ring buffer record as written by connect.c.
func DecodeEvent(b []byte) (Event, error) {
	if len(b) < EventSize {
		return Event{}, fmt.Errorf("%w: %d bytes, want %d", ErrBadEvent, len(b), EventSize)
	}
	le := binary.LittleEndian
	e := Event{
		Kind:      Kind(le.Uint32(b[0:])),
		TGID:      le.Uint32(b[8:]),
		PID:       le.Uint32(b[12:]),
		UID:       le.Uint32(b[16:]),
		GID:       le.Uint32(b[20:]),
		CgroupID:  le.Uint64(b[24:]),
		StartTime: le.Uint64(b[32:]),
		Inode:     le.Uint64(b[40:]),
		Time:      le.Uint64(b[48:]),
		NSPID:     le.Uint32(b[56:]),
		Family:    le.Uint16(b[60:]),
		Comm:      cString(b[104:120]),
	}
	flags := le.Uint32(b[4:])
	e.Guarded = flags&flagGuarded != 0
	e.Watched = flags&flagWatched != 0
	e.Blocked = flags&flagBlocked != 0

	dport := le.Uint16(b[62:])
	sport := le.Uint16(b[64:])
	pathLen := int(le.Uint16(b[66:]))

	switch e.Kind {
	case KindConnect4, KindConnect6, KindTCPEstablished:
		e.Addr = netip.AddrPortFrom(inetAddr(b[72:88], e.Family), dport)
		if e.Kind == KindTCPEstablished {
			e.Src = netip.AddrPortFrom(inetAddr(b[88:104], e.Family), sport)
		}
	case KindConnectUnix, KindConnectUnixTP:
		path := b[120 : 120+108]
		if pathLen > len(path) {
			return Event{}, fmt.Errorf("%w: path length %d exceeds %d", ErrBadEvent, pathLen, len(path))
		}
		e.Path = unixPath(path[:pathLen])
	default:
		return Event{}, fmt.Errorf("%w: unknown kind %d", ErrBadEvent, e.Kind)
	}
	return e, nil
}

func inetAddr(b []byte, family uint16) netip.Addr {
	a := netip.AddrFrom16([16]byte(b))
	if family == afInet {
		a = a.Unmap()
	}
	return a
}

func cString(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}

// unixPath renders a sun_path: abstract names (leading NUL) get a leading '@'.
func unixPath(b []byte) string {
	if len(b) > 0 && b[0] == 0 {
		return "@" + string(b[1:])
	}
	return cString(b)
}
