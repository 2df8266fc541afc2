package rawio_test

import (
	"testing"

	"golang.org/x/sys/unix"

	"github.com/pgward/pgward/broker/rawio"
)

// Read, Write and EpollPoll behave as the runtime's wrappers on a
// non-blocking socket pair: bytes through, EAGAIN as an Errno, readiness.
func TestRawCalls(t *testing.T) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fds[0])
	defer unix.Close(fds[1])
	ep, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(ep)
	if err := unix.EpollCtl(ep, unix.EPOLL_CTL_ADD, fds[1], &unix.EpollEvent{Events: unix.EPOLLIN, Fd: 7}); err != nil {
		t.Fatal(err)
	}
	events := make([]unix.EpollEvent, 4)
	if n, err := rawio.EpollPoll(ep, events); n != 0 || err != nil {
		t.Fatalf("poll with nothing sent: %d, %v", n, err)
	}
	buf := make([]byte, 16)
	if n, err := rawio.Read(fds[1], buf); err != unix.EAGAIN || n != 0 {
		t.Fatalf("read of an empty socket: %d, %v; want 0, EAGAIN", n, err)
	}
	if n, err := rawio.Write(fds[0], []byte("hello")); n != 5 || err != nil {
		t.Fatalf("write: %d, %v", n, err)
	}
	if n, err := rawio.EpollPoll(ep, events); n != 1 || err != nil || events[0].Fd != 7 {
		t.Fatalf("poll after a write: %d, %v, %+v", n, err, events[0])
	}
	if n, err := rawio.Read(fds[1], buf); n != 5 || err != nil || string(buf[:n]) != "hello" {
		t.Fatalf("read: %d, %v, %q", n, err, buf[:n])
	}
	if _, err := rawio.Write(-1, []byte("x")); err != unix.EBADF {
		t.Fatalf("write to -1: %v, want EBADF", err)
	}
	if n, err := rawio.EpollPoll(ep, nil); n != 0 || err != nil {
		t.Fatalf("poll with no room: %d, %v", n, err)
	}
}
