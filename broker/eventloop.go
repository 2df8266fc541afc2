package broker

import (
	"errors"
	"io"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pgward/pgward/broker/rawio"
)

// The event loop (listen.event_loop) relays a session's messages without a
// goroutine hand-off per message. The Go runtime's netpoller wakes a
// goroutine for every message: a read that finds nothing, a park, an
// epoll_wait, a wake-up and a switch (docs/performance.md). With the loop,
// a session's two sockets are taken out of the netpoller after the login
// (loopConn) and put in one epoll set served by one locked OS thread, as
// PgBouncer's libevent loop is; when a socket is readable the loop runs the
// pump of that direction right there (relay.go: scan, audit, write to the
// peer without blocking) and goes back to epoll_wait.
//
// Whatever must wait — a write to a peer that does not read, a barrier
// waiting for the server's answers, a wait for buffer memory, the end of a
// session — is handed to the pump's own goroutine, which waits as it would
// without the loop (the blocking net.Conn methods of loopConn wait for the
// loop's readiness notes), then gives the socket back to the loop.

// eventLoop is one epoll set on one locked OS thread.
type eventLoop struct {
	epfd   int
	wakeFD int // eventfd: kicks pending

	mu    sync.Mutex
	conns map[uint64]*loopConn
	next  uint64
	kicks []*loopConn // run their inline handler once (under mu)

	// after holds what runs once a round's events are handled (loop
	// thread only): the client pumps whose reads were staged for the
	// round's one audit write (relay.go, commit).
	after, afterSpare []*func()

	tid     int           // the loop's OS thread, set before started closes
	started chan struct{} // closed once run has locked its thread
}

var (
	loopsMu  sync.Mutex
	theLoops []*eventLoop // under loopsMu; only ever appended to
	loopNext atomic.Uint32
)

// maxEventLoops bounds listen.event_loop_threads.
const maxEventLoops = 256

// startLoops makes sure the process runs at least n event loops (0: one),
// starting what is missing.
func startLoops(n int) error {
	n = min(max(n, 1), maxEventLoops)
	loopsMu.Lock()
	defer loopsMu.Unlock()
	for len(theLoops) < n {
		l, err := newEventLoop()
		if err != nil {
			return err
		}
		theLoops = append(theLoops, l)
		go l.run()
		<-l.started
		if loopsNice != 0 {
			_ = unix.Setpriority(unix.PRIO_PROCESS, l.tid, loopsNice)
		}
	}
	return nil
}

// loopsNice is the nice value last given to the loops' threads (under
// loopsMu).
var loopsNice int

// setLoopsNice gives every event loop's thread the nice value n
// (listen.event_loop_nice), and loops started later too. One thread
// serving every session gets one runnable thread's share of the CPUs, as
// each backend and client does; with hundreds of busy sessions that share
// is what their tail latency waits for (docs/performance.md). A negative
// value needs CAP_SYS_NICE or an RLIMIT_NICE that allows it; when it is
// refused the loops keep the priority they had and the error is returned.
func setLoopsNice(n int) error {
	loopsMu.Lock()
	defer loopsMu.Unlock()
	if n == loopsNice {
		return nil
	}
	for _, l := range theLoops {
		if err := unix.Setpriority(unix.PRIO_PROCESS, l.tid, n); err != nil {
			return os.NewSyscallError("setpriority", err)
		}
	}
	loopsNice = n
	return nil
}

// loops returns the event loops started so far.
func loops() []*eventLoop {
	loopsMu.Lock()
	defer loopsMu.Unlock()
	return theLoops
}

// pickLoop returns the loop for a new session: round robin.
func pickLoop() (*eventLoop, error) {
	if err := startLoops(1); err != nil {
		return nil, err
	}
	ls := loops()
	return ls[int(loopNext.Add(1)%uint32(len(ls)))], nil
}

const wakeID = 0

func newEventLoop() (*eventLoop, error) {
	ep, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, os.NewSyscallError("epoll_create1", err)
	}
	wfd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(ep)
		return nil, os.NewSyscallError("eventfd", err)
	}
	if err := unix.EpollCtl(ep, unix.EPOLL_CTL_ADD, wfd, &unix.EpollEvent{Events: unix.EPOLLIN}); err != nil {
		unix.Close(ep)
		unix.Close(wfd)
		return nil, os.NewSyscallError("epoll_ctl", err)
	}
	return &eventLoop{epfd: ep, wakeFD: wfd, conns: map[uint64]*loopConn{}, next: wakeID + 1, started: make(chan struct{})}, nil
}

func (l *eventLoop) run() {
	runtime.LockOSThread()
	l.tid = unix.Gettid()
	close(l.started)
	events := make([]unix.EpollEvent, 256)
	var kicks []*loopConn
	for {
		// Commits staged while the last ones ran wait for this round:
		// look at the sockets without blocking, then run them.
		var n int
		var err error
		if len(l.after) > 0 {
			n, err = rawio.EpollPoll(l.epfd, events)
		} else {
			n, err = unix.EpollWait(l.epfd, events, -1)
		}
		if err != nil {
			continue // EINTR
		}
		for i := range events[:n] {
			ev := &events[i]
			id := uint64(uint32(ev.Fd)) | uint64(uint32(ev.Pad))<<32
			if id == wakeID {
				var b [8]byte
				_, _ = rawio.Read(l.wakeFD, b[:])
				l.mu.Lock()
				kicks, l.kicks = l.kicks, kicks[:0]
				l.mu.Unlock()
				for _, c := range kicks {
					c.kicked.Store(false)
					c.readable()
				}
				clear(kicks)
				continue
			}
			l.mu.Lock()
			c := l.conns[id]
			l.mu.Unlock()
			if c == nil {
				continue // closed since epoll_wait returned
			}
			if ev.Events&unix.EPOLLOUT != 0 {
				notify(c.wch)
			}
			if ev.Events&(unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
				// The peer shut down (or an error): a short read no
				// longer means nothing is left; the end is read too.
				c.hup.Store(true)
			}
			if ev.Events&^unix.EPOLLOUT != 0 {
				c.readable()
			}
		}
		l.runAfter()
	}
}

// afterRound runs h once the events of this round are handled (loop
// thread).
func (l *eventLoop) afterRound(h *func()) { l.after = append(l.after, h) }

// runAfter runs what the round's handlers left for its end. What those
// leave in turn waits for the next round, so that a session that keeps
// sending cannot keep the loop from the other sockets.
func (l *eventLoop) runAfter() {
	hs := l.after
	l.after = l.afterSpare[:0]
	for _, h := range hs {
		(*h)()
	}
	clear(hs)
	l.afterSpare = hs[:0]
}

// kick makes the loop run c's inline handler (or wake its reader) once.
func (l *eventLoop) kick(c *loopConn) {
	if c.kicked.Swap(true) {
		return
	}
	l.mu.Lock()
	l.kicks = append(l.kicks, c)
	l.mu.Unlock()
	var one = [8]byte{1}
	_, _ = rawio.Write(l.wakeFD, one[:])
}

func notify(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// errWouldBlock: an inline read found nothing, or an inline write could not
// send everything (the rest waits in loopConn.unsent).
var errWouldBlock = errors.New("would block")

// loopConn is a session socket taken out of the Go runtime's netpoller and
// served by the event loop. Its net.Conn methods block as a net.Conn's do
// (waiting for the loop's readiness notes, with deadlines); readInline and
// writeInline never block and are what the loop thread uses.
type loopConn struct {
	loop *eventLoop
	id   uint64
	fd   int // under mu; -1 once closed
	// inline is the handler the loop runs on the loop thread when the
	// socket is readable; nil while a goroutine owns the reading.
	inline atomic.Pointer[func()]
	kicked atomic.Bool
	// hup: the peer shut down its side; readers read on to the end.
	hup atomic.Bool

	mu     sync.Mutex // the descriptor: every system call on it holds mu
	unsent []byte     // written by writeInline, not yet sent (in order)
	busy   bool       // a Write is sending from its caller's buffer: unsent goes after it
	outOn  bool       // EPOLLOUT is in the registration (a writer waits)
	wmu    sync.Mutex // one blocking writer at a time

	rch, wch chan struct{} // readiness notes from the loop (capacity 1)
	done     chan struct{} // closed by Close
	rdl, wdl atomic.Int64  // deadlines, Unix nanoseconds; 0 none
	dlch     chan struct{} // a deadline changed: blocked callers look again
	timer    *time.Timer   // kicks an inline reader at its deadline (under mu)

	laddr, raddr net.Addr
	network      string
}

// attachLoop takes c out of the netpoller: its descriptor is duplicated and
// c closed, and the duplicate joins the loop's epoll set. Only plain Unix
// and TCP connections qualify (TLS keeps its net.Conn); ok is false for the
// others, and c is then untouched.
func (l *eventLoop) attach(c net.Conn) (lc *loopConn, ok bool, err error) {
	if lc, ok := c.(*loopConn); ok {
		return lc, true, nil
	}
	switch c.(type) {
	case *net.UnixConn, *net.TCPConn:
	default:
		return nil, false, nil
	}
	sc := c.(syscall.Conn)
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil, false, err
	}
	fd := -1
	var derr error
	if err := rc.Control(func(s uintptr) { fd, derr = unix.FcntlInt(s, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return nil, false, err
	}
	if derr != nil {
		return nil, false, os.NewSyscallError("fcntl", derr)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, false, os.NewSyscallError("fcntl", err)
	}
	lc = &loopConn{
		loop: l, fd: fd,
		rch: make(chan struct{}, 1), wch: make(chan struct{}, 1), done: make(chan struct{}), dlch: make(chan struct{}),
		laddr: c.LocalAddr(), raddr: c.RemoteAddr(), network: c.LocalAddr().Network(),
	}
	l.mu.Lock()
	lc.id = l.next
	l.next++
	l.conns[lc.id] = lc
	l.mu.Unlock()
	if err := unix.EpollCtl(l.epfd, unix.EPOLL_CTL_ADD, fd, lc.event(false)); err != nil {
		l.mu.Lock()
		delete(l.conns, lc.id)
		l.mu.Unlock()
		unix.Close(fd)
		return nil, false, os.NewSyscallError("epoll_ctl", err)
	}
	// The original leaves the netpoller; the socket stays open through fd.
	c.Close()
	return lc, true, nil
}

func (c *loopConn) event(out bool) *unix.EpollEvent {
	ev := &unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLET, Fd: int32(uint32(c.id)), Pad: int32(uint32(c.id >> 32))}
	if out {
		ev.Events |= unix.EPOLLOUT
	}
	return ev
}

// readable runs on the loop thread.
func (c *loopConn) readable() {
	if h := c.inline.Load(); h != nil {
		(*h)()
		return
	}
	notify(c.rch)
}

// drained reports whether a read that did not fill its buffer left the
// socket empty (no end waiting behind the data).
func (c *loopConn) drained() bool { return !c.hup.Load() }

// setInline makes h the socket's reader on the loop thread (nil: a
// goroutine reads). Setting a handler runs it once, for what arrived
// while no one was looking.
func (c *loopConn) setInline(h *func()) {
	c.inline.Store(h)
	if h != nil {
		c.loop.kick(c)
	}
}

func (c *loopConn) deadlineErr(dl *atomic.Int64) error {
	if d := dl.Load(); d != 0 && time.Now().UnixNano() >= d {
		return os.ErrDeadlineExceeded
	}
	return nil
}

func (c *loopConn) opErr(op string, err error) error {
	if err == nil || err == io.EOF {
		return err
	}
	if errors.Is(err, net.ErrClosed) || errors.Is(err, os.ErrDeadlineExceeded) {
		return &net.OpError{Op: op, Net: c.network, Source: c.laddr, Addr: c.raddr, Err: err}
	}
	return &net.OpError{Op: op, Net: c.network, Source: c.laddr, Addr: c.raddr, Err: os.NewSyscallError(op, err)}
}

// readInline reads once without waiting: errWouldBlock when there is
// nothing, io.EOF at the end, a deadline or closed error as Read gives.
func (c *loopConn) readInline(b []byte) (int, error) {
	if err := c.deadlineErr(&c.rdl); err != nil {
		return 0, c.opErr("read", err)
	}
	c.mu.Lock()
	if c.fd < 0 {
		c.mu.Unlock()
		return 0, c.opErr("read", net.ErrClosed)
	}
	n, err := ignoringEINTRRead(c.fd, b)
	c.mu.Unlock()
	switch {
	case err == unix.EAGAIN:
		return 0, errWouldBlock
	case err != nil:
		return 0, c.opErr("read", err)
	case n == 0 && len(b) > 0:
		return 0, io.EOF
	}
	return n, nil
}

func ignoringEINTRRead(fd int, b []byte) (int, error) {
	for {
		n, err := rawio.Read(fd, b)
		if err != unix.EINTR {
			return n, err
		}
	}
}

// Read blocks until something was read, the end, the deadline or Close.
func (c *loopConn) Read(b []byte) (int, error) {
	if len(b) == 0 {
		return 0, nil
	}
	for {
		n, err := c.readInline(b)
		if err != errWouldBlock {
			return n, err
		}
		if err := c.wait(c.rch, &c.rdl, "read"); err != nil {
			return 0, err
		}
	}
}

// wait waits for a note on ch, the deadline in dl, or Close.
func (c *loopConn) wait(ch chan struct{}, dl *atomic.Int64, op string) error {
	var t *time.Timer
	stop := func() {
		if t != nil {
			t.Stop()
			t = nil
		}
	}
	for {
		c.mu.Lock()
		dlch := c.dlch
		c.mu.Unlock()
		var tc <-chan time.Time
		if d := dl.Load(); d != 0 {
			left := time.Until(time.Unix(0, d))
			if left <= 0 {
				return c.opErr(op, os.ErrDeadlineExceeded)
			}
			t = time.NewTimer(left)
			tc = t.C
		}
		select {
		case <-ch:
			stop()
			return nil
		case <-c.done:
			stop()
			return c.opErr(op, net.ErrClosed)
		case <-tc:
			return c.opErr(op, os.ErrDeadlineExceeded)
		case <-dlch:
			stop()
		}
	}
}

// writeInline sends b without waiting, behind anything unsent; what the
// socket does not take now is kept in order (errWouldBlock), to be sent by
// flush. The inline pumps write at most a standard read's worth (a grown
// buffer is processed by the pump's goroutine: relay.go), so that copy is
// bounded as the goroutine relay's read buffer is.
func (c *loopConn) writeInline(b []byte) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.fd < 0 {
		return c.opErr("write", net.ErrClosed)
	}
	if len(c.unsent) > 0 || c.busy {
		c.unsent = append(c.unsent, b...)
		return errWouldBlock
	}
	n, err := c.writeLocked(b)
	if err != nil && err != unix.EAGAIN {
		return c.opErr("write", err)
	}
	if n < len(b) {
		c.unsent = append(c.unsent, b[n:]...)
		return errWouldBlock
	}
	return nil
}

func (c *loopConn) writeLocked(b []byte) (int, error) {
	sent := 0
	for sent < len(b) {
		n, err := rawio.Write(c.fd, b[sent:])
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return sent, err
		}
		sent += n
	}
	return sent, nil
}

// pendingOut reports whether written bytes wait to be sent.
func (c *loopConn) pendingOut() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.unsent) > 0
}

// Write sends b, after anything unsent, waiting for the peer to read. It
// sends from b itself: a large message stays in the caller's (counted)
// buffer until the peer has read it, never copied.
func (c *loopConn) Write(b []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if err := c.deadlineErr(&c.wdl); err != nil {
		return 0, c.opErr("write", err)
	}
	if err := c.send(nil); err != nil {
		return 0, err
	}
	c.mu.Lock()
	c.busy = true // an inline write meanwhile goes behind b (unsent)
	c.mu.Unlock()
	sent := 0
	err := c.send(func(fd int) (bool, error) {
		n, err := c.writeLocked(b[sent:])
		sent += n
		return sent == len(b), err
	})
	c.mu.Lock()
	c.busy = false
	c.mu.Unlock()
	return sent, err
}

// flush sends what writeInline left, waiting for the peer to read.
func (c *loopConn) flush() error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return c.send(nil)
}

// send writes until put reports that it is done (nil: until nothing is
// unsent), waiting for the peer to read in between. Under wmu.
func (c *loopConn) send(put func(fd int) (bool, error)) error {
	if put == nil {
		put = func(fd int) (bool, error) {
			n, err := c.writeLocked(c.unsent)
			c.unsent = c.unsent[:copy(c.unsent, c.unsent[n:])]
			if len(c.unsent) == 0 {
				// Sent: a session keeps no buffer between slow writes
				// (the goroutine relay's goes back to its pool too).
				c.unsent = nil
			}
			return len(c.unsent) == 0, err
		}
	}
	for {
		c.mu.Lock()
		if c.fd < 0 {
			c.mu.Unlock()
			return c.opErr("write", net.ErrClosed)
		}
		done, err := put(c.fd)
		if err != nil && err != unix.EAGAIN {
			c.mu.Unlock()
			return c.opErr("write", err)
		}
		if done {
			if c.outOn {
				c.outOn = false
				_ = unix.EpollCtl(c.loop.epfd, unix.EPOLL_CTL_MOD, c.fd, c.event(false))
			}
			c.mu.Unlock()
			return nil
		}
		if !c.outOn {
			// Told when the peer has read: an edge after this MOD.
			c.outOn = true
			select {
			case <-c.wch:
			default:
			}
			_ = unix.EpollCtl(c.loop.epfd, unix.EPOLL_CTL_MOD, c.fd, c.event(true))
		}
		c.mu.Unlock()
		if err := c.wait(c.wch, &c.wdl, "write"); err != nil {
			return err
		}
	}
}

// Close closes the socket; a reader, writer or inline handler sees
// net.ErrClosed.
func (c *loopConn) Close() error {
	c.mu.Lock()
	if c.fd < 0 {
		c.mu.Unlock()
		return c.opErr("close", net.ErrClosed)
	}
	_ = unix.EpollCtl(c.loop.epfd, unix.EPOLL_CTL_DEL, c.fd, nil)
	err := unix.Close(c.fd)
	c.fd = -1
	c.unsent = nil
	if c.timer != nil {
		c.timer.Stop()
	}
	c.mu.Unlock()
	c.loop.mu.Lock()
	delete(c.loop.conns, c.id)
	c.loop.mu.Unlock()
	close(c.done)
	if c.inline.Load() != nil {
		c.loop.kick(c)
	}
	if err != nil {
		return c.opErr("close", err)
	}
	return nil
}

// CloseWrite shuts down the writing side (a clean end tells the server).
func (c *loopConn) CloseWrite() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.fd < 0 {
		return c.opErr("close", net.ErrClosed)
	}
	return c.opErr("close", unix.Shutdown(c.fd, unix.SHUT_WR))
}

func (c *loopConn) LocalAddr() net.Addr  { return c.laddr }
func (c *loopConn) RemoteAddr() net.Addr { return c.raddr }

func (c *loopConn) SetDeadline(t time.Time) error {
	c.setDeadline(&c.rdl, t)
	c.setDeadline(&c.wdl, t)
	return nil
}

func (c *loopConn) SetReadDeadline(t time.Time) error {
	c.setDeadline(&c.rdl, t)
	return nil
}

func (c *loopConn) SetWriteDeadline(t time.Time) error {
	c.setDeadline(&c.wdl, t)
	return nil
}

func (c *loopConn) setDeadline(dl *atomic.Int64, t time.Time) {
	var d int64
	if !t.IsZero() {
		d = t.UnixNano()
	}
	dl.Store(d)
	c.mu.Lock()
	close(c.dlch) // blocked callers look again
	c.dlch = make(chan struct{})
	if dl == &c.rdl {
		if c.timer != nil {
			c.timer.Stop()
			c.timer = nil
		}
		// An inline reader is not waiting anywhere: it is told at the
		// deadline, and reads the timeout as a blocked Read would.
		if d != 0 && c.fd >= 0 {
			if left := time.Until(t); left <= 0 {
				c.loop.kick(c)
			} else {
				c.timer = time.AfterFunc(left, func() { c.loop.kick(c) })
			}
		}
	}
	c.mu.Unlock()
}
