package bpf

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/pgward/pgward/testenv"
)

// BenchmarkConnectLoopback measures connect() to a loopback TCP listener from
// a process in a child cgroup: without programs, with programs attached and an
// endpoint that does not match (every connect on a host pays this), and to a
// watched endpoint (connect event, pending record, established event). Each op
// is socket + connect + close; compare ns/op between the cases. With kernel
// BPF statistics on, bpf-ns/connect is the programs' own run time per connect.
func BenchmarkConnectLoopback(b *testing.B) {
	requireRoot(b)
	cg := testenv.NewCgroup(b, "")
	cg.Enter(b)

	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	addr := netip.MustParseAddrPort(ln.Addr().String())
	sa := &unix.SockaddrInet4{Addr: addr.Addr().As4(), Port: int(addr.Port())}

	connect := func(b *testing.B) {
		for b.Loop() {
			fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				b.Fatal(err)
			}
			if err := unix.Connect(fd, sa); err != nil {
				b.Fatal(err)
			}
			unix.Close(fd)
		}
	}

	b.Run("no programs", connect)

	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err == nil {
		defer stats.Close()
	}
	p, err := Load(Options{CgroupPath: cg.Path, ExemptTGID: uint32(os.Getpid())})
	if err != nil {
		b.Fatal(err)
	}
	defer p.Close()
	go func() {
		for {
			if _, err := p.Read(); err != nil {
				return
			}
		}
	}()
	// Something in the maps, not matching.
	if err := p.Guard(Endpoint{TCP: netip.MustParseAddrPort("192.0.2.1:5432")}); err != nil {
		b.Fatal(err)
	}

	withStats := func(b *testing.B) {
		before := p.runTime()
		connect(b)
		after := p.runTime()
		for name, st := range after {
			if d := st[0] - before[name][0]; d > 0 {
				b.ReportMetric(float64(d)/float64(b.N), fmt.Sprintf("%s-ns/op", shortName(name)))
				b.ReportMetric(float64(st[1]-before[name][1])/float64(b.N), fmt.Sprintf("%s-runs/op", shortName(name)))
			}
		}
	}
	b.Run("attached unmatched", withStats)

	if err := p.Watch(Endpoint{TCP: addr}); err != nil {
		b.Fatal(err)
	}
	b.Run("attached watched", withStats)
}

// runTime is each program's accumulated run time in ns and run count (BPF_STATS_RUN_TIME).
func (p *Probes) runTime() map[string][2]int64 {
	m := make(map[string][2]int64)
	for i, prog := range p.progs {
		if s, err := prog.Stats(); err == nil {
			m[p.progNames[i]] = [2]int64{int64(s.Runtime), int64(s.RunCount)}
		}
	}
	return m
}

func shortName(prog string) string {
	switch prog {
	case ProgConnect4:
		return "bpf-connect4"
	case ProgInetSockSetState:
		return "bpf-sockstate"
	}
	return "bpf-other"
}
