package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"runtime"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/pgward/pgward/broker/rawio"
)

// runLoopRelay is the relay-loop child: the minimal relay of runRelay,
// bytes both ways and no parsing, but driven by one event loop over epoll
// on one locked OS thread (as PgBouncer's libevent loop is), instead of a
// goroutine per direction on the Go runtime's netpoller. It measures what
// an event-loop relay in Go can reach on this machine: the ceiling of that
// direction for pgward's relay (issue 16), beside the goroutine relay.
//
// Level-triggered; one read of up to 32 KiB per ready descriptor per
// wake-up, written to the peer at once. A write that would block waits
// for the peer with poll(2): pgbench's messages are small, so that is rare
// and only costs this bench relay, never correctness.
func runLoopRelay(listen, upstream string) int {
	defer profileCPU()()
	if err := loopRelay(listen, upstream); err != nil {
		fmt.Fprintln(os.Stderr, "relay-loop:", err)
		return 1
	}
	return 0
}

func loopRelay(listen, upstream string) error {
	runtime.LockOSThread()
	lfd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	_ = os.Remove(listen)
	if err := unix.Bind(lfd, &unix.SockaddrUnix{Name: listen}); err != nil {
		return err
	}
	if err := unix.Listen(lfd, 512); err != nil {
		return err
	}
	_ = os.Chmod(listen, 0o777)
	ep, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return err
	}
	watch := func(fd int) error {
		return unix.EpollCtl(ep, unix.EPOLL_CTL_ADD, fd, &unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLRDHUP, Fd: int32(fd)})
	}
	if err := watch(lfd); err != nil {
		return err
	}
	// SIGTERM ends the loop through a pipe it watches.
	var stop [2]int
	if err := unix.Pipe2(stop[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		return err
	}
	if err := watch(stop[0]); err != nil {
		return err
	}
	go func() {
		ch := make(chan os.Signal, 1)
		signal.Notify(ch, syscall.SIGTERM)
		<-ch
		_, _ = unix.Write(stop[1], []byte{1})
	}()

	peer := map[int]int{} // each side's other side
	shadows := map[int]net.Conn{}
	closePair := func(fd int) {
		p, ok := peer[fd]
		if !ok {
			return
		}
		delete(peer, fd)
		delete(peer, p)
		for _, x := range []int{fd, p} {
			if c, ok := shadows[x]; ok {
				c.Close()
				delete(shadows, x)
			}
		}
		unix.Close(fd) // closing removes them from the epoll set
		unix.Close(p)
	}
	dial := func() (int, error) {
		fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return -1, err
		}
		if err := unix.Connect(fd, &unix.SockaddrUnix{Name: upstream}); err != nil {
			unix.Close(fd)
			return -1, err
		}
		if err := unix.SetNonblock(fd, true); err != nil {
			unix.Close(fd)
			return -1, err
		}
		return fd, nil
	}
	// PGWARD_BENCH_LOOP_NETPOLL=1: every descriptor is also registered
	// with the Go runtime's netpoller (a net.Conn on a dup of it, as a
	// session's connections are in pgward), with a goroutine waiting in
	// the netpoller, to measure what that registration costs the loop.
	netpollToo := os.Getenv("PGWARD_BENCH_LOOP_NETPOLL") == "1"
	shadow := func(fd int) {
		d, err := unix.Dup(fd)
		if err != nil {
			return
		}
		f := os.NewFile(uintptr(d), "shadow")
		c, err := net.FileConn(f)
		f.Close()
		if err == nil {
			shadows[fd] = c
		}
	}
	if netpollToo {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err == nil {
			go func() { _, _ = l.Accept() }()
		}
	}
	buf := make([]byte, 32<<10)
	events := make([]unix.EpollEvent, 128)
	for {
		n, err := unix.EpollWait(ep, events, -1)
		if err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			return err
		}
		for _, ev := range events[:n] {
			fd := int(ev.Fd)
			switch fd {
			case stop[0]:
				return nil
			case lfd:
				for {
					c, _, err := unix.Accept4(lfd, unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC)
					if err != nil {
						break
					}
					u, err := dial()
					if err != nil {
						unix.Close(c)
						continue
					}
					if netpollToo {
						shadow(c)
						shadow(u)
					}
					peer[c], peer[u] = u, c
					if watch(c) != nil || watch(u) != nil {
						closePair(c)
					}
				}
				continue
			}
			p, ok := peer[fd]
			if !ok {
				continue // closed earlier in this batch
			}
			m, err := rawio.Read(fd, buf)
			if err == unix.EAGAIN {
				continue
			}
			if m <= 0 || err != nil {
				closePair(fd)
				continue
			}
			if writeAll(p, buf[:m]) != nil {
				closePair(fd)
			}
		}
	}
}

// writeAll writes b to the non-blocking fd, waiting with poll(2) when the
// socket is full.
func writeAll(fd int, b []byte) error {
	for len(b) > 0 {
		n, err := rawio.Write(fd, b)
		if err == unix.EAGAIN {
			pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
			if _, err := unix.Poll(pfd, -1); err != nil && err != unix.EINTR {
				return err
			}
			continue
		}
		if err != nil {
			return err
		}
		b = b[n:]
	}
	return nil
}
