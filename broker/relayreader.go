package broker

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"time"
)

// relayBufPool holds the relay's standard read buffers (relayBufSize). A
// session holds one only while bytes are in flight: an idle session waits
// for its socket to become readable without a buffer, so thousands of idle
// sessions cost their goroutines and sockets, not 2 × relayBufSize each.
// Larger buffers, grown for one message, are never pooled: they are dropped
// as soon as the message is through, so their memory goes back to the
// runtime (and, by its scavenger, to the OS).
var relayBufPool = sync.Pool{New: func() any { b := make([]byte, relayBufSize); return &b }}

// relayReader reads one direction of the relay into a buffer it borrows
// from relayBufPool when there is something to read and returns when all of
// it was forwarded. buf[:n] holds bytes read and not yet forwarded.
//
// On sockets that expose their descriptor (Unix and TCP connections) the
// wait for data happens without a buffer: the read is attempted with a
// borrowed buffer, and on EAGAIN the buffer goes back before the goroutine
// parks (the same syscalls as net.Conn.Read). Other connections (TLS) keep
// their buffer while the session lasts.
type relayReader struct {
	conn   net.Conn
	rc     syscall.RawConn // nil: plain conn.Read
	lc     *loopConn       // the event loop's socket (eventloop.go): idles without a buffer too
	buf    *[]byte         // nil while idle (rc != nil)
	big    []byte          // a buffer grown past relayBufSize for one large message
	budget *bufferBudget   // what big is counted against
	// charged is what this reader holds of budget (len(big), or 0).
	charged int64
	n       int
	// seeded: the pending bytes were put there by seed, not read yet;
	// the next read reports them without reading.
	seeded bool
	// fill is the callback handed to rc.Read, made once.
	fill    func(fd uintptr) bool
	fillN   int
	fillErr error
}

func newRelayReader(c net.Conn, budget *bufferBudget) *relayReader {
	r := &relayReader{conn: c, budget: budget}
	r.lc, _ = c.(*loopConn)
	if sc, ok := c.(syscall.Conn); ok {
		if rc, err := sc.SyscallConn(); err == nil {
			r.rc = rc
			r.fill = r.fillFD
		}
	}
	return r
}

func (r *relayReader) bytes() []byte {
	if r.big != nil {
		return r.big
	}
	if r.buf == nil {
		r.buf = relayBufPool.Get().(*[]byte)
	}
	return *r.buf
}

// pending is what was read and not yet forwarded.
func (r *relayReader) pending() []byte { return r.bytes()[:r.n] }

// seed makes b (bytes read from the connection by someone else, such as
// the upstream login) the first pending bytes: the next read returns them.
// Nothing may be pending.
func (r *relayReader) seed(b []byte) {
	if len(b) == 0 {
		return
	}
	if len(b) > relayBufSize {
		// Not in production (the login reads through a standard buffer),
		// but bounded and counted all the same.
		_ = r.budget.take(r, int64(len(b)), nil)
		r.big = make([]byte, len(b))
	}
	r.n = copy(r.bytes(), b)
	r.seeded = true
}

// read reads more bytes after the pending ones and returns how many.
func (r *relayReader) read() (int, error) {
	if r.seeded {
		r.seeded = false
		return r.n, nil
	}
	if r.n > 0 || r.rc == nil {
		m, err := r.conn.Read(r.bytes()[r.n:])
		r.n += m
		return m, err
	}
	r.fillN, r.fillErr = 0, nil
	if err := r.rc.Read(r.fill); err != nil {
		return 0, err
	}
	if r.fillErr != nil {
		return 0, &net.OpError{Op: "read", Net: r.conn.LocalAddr().Network(), Addr: r.conn.LocalAddr(), Err: os.NewSyscallError("read", r.fillErr)}
	}
	if r.fillN == 0 {
		return 0, io.EOF
	}
	r.n = r.fillN
	return r.fillN, nil
}

func (r *relayReader) fillFD(fd uintptr) bool {
	b := r.bytes()
	for {
		m, err := syscall.Read(int(fd), b)
		switch {
		case errors.Is(err, syscall.EINTR):
			continue
		case errors.Is(err, syscall.EAGAIN):
			r.idle()
			return false
		case err != nil:
			r.fillErr = err
		default:
			r.fillN = m
		}
		return true
	}
}

// consume drops the first k pending bytes (forwarded). A grown buffer is
// dropped (and its budget given back) as soon as what is left fits in a
// standard one: large buffers are never kept or pooled.
func (r *relayReader) consume(k int) {
	b := r.bytes()
	copy(b, b[k:r.n])
	r.n -= k
	if r.big != nil && r.n <= relayBufSize {
		big := r.big
		r.big = nil
		if r.n > 0 || r.rc == nil {
			copy(r.bytes(), big[:r.n])
		}
		r.budget.giveBack(r)
	}
	if r.n == 0 && (r.rc != nil || r.lc != nil) {
		r.idle()
	}
}

// readInline reads once from the event loop's socket without waiting
// (errWouldBlock: nothing there). full reports that the read filled the
// buffer: more may be waiting.
func (r *relayReader) readInline(c *loopConn) (m int, full bool, err error) {
	if r.seeded {
		r.seeded = false
		return r.n, true, nil
	}
	b := r.bytes()
	if r.n == len(b) {
		return 0, false, errWouldBlock // not reached: room made space, or the pump waits for it
	}
	m, err = c.readInline(b[r.n:])
	if err != nil {
		if r.n == 0 {
			r.idle()
		}
		return 0, false, err
	}
	full = m == len(b)-r.n
	r.n += m
	return m, full, nil
}

// mustGrow reports whether room(need) would grow the buffer (and so may
// wait for buffer memory).
func (r *relayReader) mustGrow(need int) bool {
	if r.n == 0 {
		return false
	}
	b := r.bytes()
	return need > len(b) && r.n >= len(b)
}

// room makes space for the next read when the pending bytes are the start
// of a message of need bytes that must be seen whole (0: none). Only a full
// buffer grows, to twice its size and at most need, so memory follows the
// bytes that arrived, never the size a header announces. The growth is
// taken from the budget, waiting (the session stops reading) while it is
// spent; gone is polled meanwhile and ends the wait with
// errBudgetAbandoned when the session is over.
func (r *relayReader) room(need int, gone func() bool) error {
	b := r.bytes()
	if need <= len(b) || r.n < len(b) {
		return nil
	}
	size := min(need, 2*len(b))
	if err := r.budget.take(r, int64(size), gone); err != nil {
		return err
	}
	g := r.budget.growSlots() // one P stays free for logins and small messages
	g <- struct{}{}
	nb := make([]byte, size)
	copy(nb, b[:r.n])
	<-g
	if r.buf != nil {
		relayBufPool.Put(r.buf)
		r.buf = nil
	}
	r.big = nb
	return nil
}

// drain reads and drops the pending bytes and up to n more, until the
// client stops sending (EOF, error) or d has passed. A client still writing
// a refused message then finishes its write and reads why, instead of
// failing it (EPIPE) when pgward closes. Memory stays the standard buffer.
func (r *relayReader) drain(n int64, d time.Duration) {
	_ = r.conn.SetReadDeadline(time.Now().Add(d))
	defer func() { _ = r.conn.SetReadDeadline(time.Time{}) }()
	r.consume(r.n)
	for n > 0 {
		m, err := r.read()
		n -= int64(m)
		r.consume(r.n)
		if err != nil {
			return
		}
	}
}

// closed reports whether the connection was closed (by the other pump or a
// terminate), for a reader waiting for budget. Connections without a
// descriptor (TLS) report false.
func (r *relayReader) closed() bool {
	return r.rc != nil && r.rc.Control(func(uintptr) {}) != nil
}

// idle returns the borrowed buffer; nothing may be pending.
func (r *relayReader) idle() {
	if r.buf != nil && r.n == 0 {
		relayBufPool.Put(r.buf)
		r.buf = nil
	}
}

// release gives the buffer back at the end of the relay.
func (r *relayReader) release() {
	if r.buf != nil {
		relayBufPool.Put(r.buf)
		r.buf = nil
	}
	r.big = nil
	r.budget.giveBack(r)
	r.n = 0
}
