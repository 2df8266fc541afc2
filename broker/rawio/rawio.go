// Package rawio makes the system calls of an event loop that never block
// (non-blocking descriptors) as raw system calls.
package rawio

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// An event loop's socket reads and writes, its eventfd and its epoll_wait
// that does not wait (timeout 0) are system calls that never block: every
// descriptor involved is non-blocking. unix.Read and unix.Write tell the Go
// runtime that a call may block (entersyscall, exitsyscall), and when one
// lasts over 20 µs — every few calls on a busy virtual machine — the runtime
// hands the thread's P to another thread and the call takes it back on its
// return: a wake-up and a switch that the loop pays for nothing. These
// wrappers make the same calls as raw system calls. An epoll_wait that
// waits (timeout -1) and file writes (pgward's audit) must keep the
// runtime's wrappers: they do block.

// Read is read(2) on a non-blocking descriptor.
func Read(fd int, b []byte) (int, error) {
	n, _, e := unix.RawSyscall(unix.SYS_READ, uintptr(fd), uintptr(unsafe.Pointer(unsafe.SliceData(b))), uintptr(len(b)))
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}

// Write is write(2) on a non-blocking descriptor.
func Write(fd int, b []byte) (int, error) {
	n, _, e := unix.RawSyscall(unix.SYS_WRITE, uintptr(fd), uintptr(unsafe.Pointer(unsafe.SliceData(b))), uintptr(len(b)))
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}

// EpollPoll is epoll_wait with timeout 0 (epoll_pwait with no signal
// mask, which every architecture has).
func EpollPoll(epfd int, events []unix.EpollEvent) (int, error) {
	if len(events) == 0 {
		return 0, nil
	}
	n, _, e := unix.RawSyscall6(unix.SYS_EPOLL_PWAIT, uintptr(epfd), uintptr(unsafe.Pointer(&events[0])), uintptr(len(events)), 0, 0, 0)
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}
