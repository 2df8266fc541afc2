package bpf

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net/netip"
	"testing"
	"unsafe"
)

// encode writes e as connect.c lays it out.
func encode(tb testing.TB, e connectEvent) []byte {
	tb.Helper()
	var buf bytes.Buffer
	if err := binary.Write(&buf, binary.LittleEndian, e); err != nil {
		tb.Fatal(err)
	}
	return buf.Bytes()
}

func cChars[T ~[16]int8 | ~[108]int8](s string) T {
	var a T
	for i := 0; i < len(s) && i < len(a); i++ {
		a[i] = int8(s[i])
	}
	return a
}

func TestEventLayout(t *testing.T) {
	if got := unsafe.Sizeof(connectEvent{}); got != EventSize {
		t.Fatalf("sizeof(struct event) = %d, EventSize = %d", got, EventSize)
	}
	var e connectEvent
	for _, f := range []struct {
		name      string
		got, want uintptr
	}{
		{"flags", unsafe.Offsetof(e.Flags), 4},
		{"cgroup_id", unsafe.Offsetof(e.CgroupId), 24},
		{"ts", unsafe.Offsetof(e.Ts), 48},
		{"nspid", unsafe.Offsetof(e.Nspid), 56},
		{"dport", unsafe.Offsetof(e.Dport), 62},
		{"path_len", unsafe.Offsetof(e.PathLen), 66},
		{"daddr", unsafe.Offsetof(e.Daddr), 72},
		{"saddr", unsafe.Offsetof(e.Saddr), 88},
		{"comm", unsafe.Offsetof(e.Comm), 104},
		{"path", unsafe.Offsetof(e.Path), 120},
	} {
		if f.got != f.want {
			t.Errorf("offset of %s = %d, DecodeEvent uses %d", f.name, f.got, f.want)
		}
	}
}

func TestEventDecode(t *testing.T) {
	mapped := netip.MustParseAddr("::ffff:127.0.0.1").As16()
	v6 := netip.MustParseAddr("2001:db8::1").As16()
	base := connectEvent{Tgid: 10, Pid: 11, Uid: 1001, Gid: 1002, CgroupId: 77, StartTime: 5e9, Inode: 4242, Ts: 6e9, Nspid: 3, Comm: cChars[[16]int8]("psql")}
	for _, tc := range []struct {
		name string
		in   func(e *connectEvent)
		want func(e *Event)
	}{
		{"connect4 guarded blocked", func(e *connectEvent) {
			e.Kind, e.Flags, e.Family, e.Daddr, e.Dport = 1, flagGuarded|flagBlocked, afInet, mapped, 5432
		}, func(e *Event) {
			e.Kind, e.Guarded, e.Blocked, e.Family, e.Addr = KindConnect4, true, true, afInet, netip.MustParseAddrPort("127.0.0.1:5432")
		}},
		{"connect6 mapped stays mapped", func(e *connectEvent) {
			e.Kind, e.Flags, e.Family, e.Daddr, e.Dport = 2, flagWatched, afInet6, mapped, 5432
		}, func(e *Event) {
			e.Kind, e.Watched, e.Family, e.Addr = KindConnect6, true, afInet6, netip.MustParseAddrPort("[::ffff:127.0.0.1]:5432")
		}},
		{"established v6", func(e *connectEvent) {
			e.Kind, e.Flags, e.Family, e.Daddr, e.Dport, e.Saddr, e.Sport = 5, flagWatched, afInet6, v6, 5432, v6, 40000
		}, func(e *Event) {
			e.Kind, e.Watched, e.Family = KindTCPEstablished, true, afInet6
			e.Addr, e.Src = netip.MustParseAddrPort("[2001:db8::1]:5432"), netip.MustParseAddrPort("[2001:db8::1]:40000")
		}},
		{"unix path", func(e *connectEvent) {
			e.Kind, e.Flags, e.Family, e.Path, e.PathLen = 3, flagWatched, afUnix, cChars[[108]int8]("/run/pgward/.s.PGSQL.5432"), 25
		}, func(e *Event) {
			e.Kind, e.Watched, e.Family, e.Path = KindConnectUnix, true, afUnix, "/run/pgward/.s.PGSQL.5432"
		}},
		{"unix abstract", func(e *connectEvent) {
			e.Kind, e.Flags, e.Family, e.Path, e.PathLen = 4, flagGuarded, afUnix, cChars[[108]int8]("\x00pg"), 3
		}, func(e *Event) {
			e.Kind, e.Guarded, e.Family, e.Path = KindConnectUnixTP, true, afUnix, "@pg"
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := base
			tc.in(&in)
			want := Event{TGID: 10, PID: 11, UID: 1001, GID: 1002, CgroupID: 77, StartTime: 5e9, Inode: 4242, Time: 6e9, NSPID: 3, Comm: "psql"}
			tc.want(&want)
			got, err := DecodeEvent(encode(t, in))
			if err != nil {
				t.Fatal(err)
			}
			if got != want {
				t.Errorf("DecodeEvent =\n%+v\nwant\n%+v", got, want)
			}
		})
	}

	for _, bad := range [][]byte{nil, make([]byte, EventSize-1), encode(t, connectEvent{Kind: 99}), encode(t, connectEvent{Kind: 3, PathLen: 109})} {
		if _, err := DecodeEvent(bad); !errors.Is(err, ErrBadEvent) {
			t.Errorf("DecodeEvent(%d bytes) accepted a bad record", len(bad))
		}
	}
}

func FuzzDecodeEvent(f *testing.F) {
	f.Add(encode(f, connectEvent{Kind: 1, Family: afInet, Dport: 5432}))
	f.Add(encode(f, connectEvent{Kind: 3, Family: afUnix, Path: cChars[[108]int8]("/tmp/x"), PathLen: 6}))
	f.Add(encode(f, connectEvent{Kind: 5, Family: afInet6, Sport: 1}))
	f.Fuzz(func(t *testing.T, b []byte) {
		e, err := DecodeEvent(b)
		if err != nil {
			return
		}
		if len(e.Path) > 108 || (e.Kind.Unix() && e.Addr.IsValid()) || (!e.Kind.Unix() && e.Path != "") {
			t.Errorf("inconsistent event %+v", e)
		}
		if e.Kind.String() == "" {
			t.Error("empty kind name")
		}
	})
}
