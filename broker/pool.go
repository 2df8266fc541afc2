package broker

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
)

// relayBufPool holds the relay's read buffers. A session holds one only
// while bytes are in flight: an idle session waits for its socket to become
// readable without a buffer, so thousands of idle sessions cost their
// goroutines and sockets, not 2 × relayBufSize each.
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
	conn net.Conn
	rc   syscall.RawConn // nil: plain conn.Read
	buf  *[]byte         // nil while idle (rc != nil)
	big  []byte          // a buffer grown past relayBufSize for one large message
	n    int
	// seeded: the pending bytes were put there by seed, not read yet;
	// the next read reports them without reading.
	seeded bool
	// fill is the callback handed to rc.Read, made once.
	fill    func(fd uintptr) bool
	fillN   int
	fillErr error
}

func newRelayReader(c net.Conn) *relayReader {
	r := &relayReader{conn: c}
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
	r.reserve(len(b))
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

// consume drops the first k pending bytes (forwarded).
func (r *relayReader) consume(k int) {
	b := r.bytes()
	copy(b, b[k:r.n])
	r.n -= k
	if r.n == 0 {
		r.big = nil
		if r.rc != nil {
			r.idle()
		}
	}
}

// reserve makes room for a message of need bytes that must be seen whole.
func (r *relayReader) reserve(need int) {
	b := r.bytes()
	if need <= len(b) {
		return
	}
	nb := make([]byte, need)
	copy(nb, b[:r.n])
	if r.buf != nil {
		relayBufPool.Put(r.buf)
		r.buf = nil
	}
	r.big = nb
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
	r.n = 0
}
