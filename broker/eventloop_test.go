package broker

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgproto3"
	"golang.org/x/sys/unix"

	"github.com/pgward/pgward/testenv"
)

// The event loop (listen.event_loop): the same sessions as without it —
// the broker's whole suite also runs with it on (PGWARD_TEST_EVENT_LOOP=1,
// make test's loop step) — and the properties only an event loop can
// break: a client that does not read must not stall the other sessions,
// large messages still pass in both directions, and the sessions really
// ran on the loop.

func loopHarness(t *testing.T) *harness {
	return newHarness(t, func(_ *harness, c *Config) { c.Listen.EventLoop = true })
}

// loopSessions counts the live sessions whose two sockets are the loop's.
func loopSessions(h *harness) (loop, all int) {
	h.srv.mu.Lock()
	defer h.srv.mu.Unlock()
	for sess := range h.srv.sessions {
		all++
		_, a := sess.client.(*loopConn)
		_, b := sess.up.conn.(*loopConn)
		if a && b {
			loop++
		}
	}
	return loop, all
}

func TestEventLoopRelaysAndAudits(t *testing.T) {
	h := loopHarness(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c := h.connect(t, testenv.ScramUser, "orders", "application_name=loop-audit")
	if loop, all := loopSessions(h); loop != 1 || all != 1 {
		t.Fatalf("sessions on the event loop: %d of %d, want 1 of 1", loop, all)
	}
	if _, err := c.Exec(ctx, "CREATE TEMP TABLE loopt (id int, v text)"); err != nil {
		t.Fatal(err)
	}
	// Simple, extended (unnamed), prepared (named, verified), a pipeline.
	for i := 0; i < 50; i++ {
		if _, err := c.Exec(ctx, fmt.Sprintf("INSERT INTO loopt VALUES (%d, 'simple')", i), pgx.QueryExecModeSimpleProtocol); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Exec(ctx, "INSERT INTO loopt VALUES ($1, 'extended')", pgx.QueryExecModeExec, i); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Exec(ctx, "INSERT INTO loopt VALUES ($1, 'prepared')", i); err != nil {
			t.Fatal(err)
		}
	}
	b := &pgx.Batch{}
	for i := 0; i < 100; i++ {
		b.Queue("INSERT INTO loopt VALUES ($1, 'batch')", 1000+i)
	}
	if err := c.SendBatch(ctx, b).Close(); err != nil {
		t.Fatal(err)
	}
	// A result far larger than the relay's buffer, and a statement too.
	var n int
	var total int64
	rows, err := c.Query(ctx, "SELECT i, repeat('x', 1000) FROM generate_series(1, 5000) i")
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var i int
		var s string
		if err := rows.Scan(&i, &s); err != nil {
			t.Fatal(err)
		}
		n++
		total += int64(len(s))
	}
	if rows.Err() != nil || n != 5000 || total != 5000*1000 {
		t.Fatalf("large result: %d rows, %d bytes, err %v", n, total, rows.Err())
	}
	big := strings.Repeat("y", 300<<10)
	var got int
	if err := c.QueryRow(ctx, "SELECT length($1::text)", big).Scan(&got); err != nil || got != len(big) {
		t.Fatalf("large parameter: %d, %v", got, err)
	}
	var count int
	if err := c.QueryRow(ctx, "SELECT count(*) FROM loopt").Scan(&count); err != nil || count != 250 {
		t.Fatalf("rows inserted: %d, %v; want 250", count, err)
	}
	c.Close(ctx)
	waitNoSessions(t, h)

	// Every statement audited, with its text, and completed.
	var sess *recSession
	for _, s := range h.obs.started() {
		if len(s.stmts) > 100 {
			s := s
			sess = &s
		}
	}
	if sess == nil {
		t.Fatal("no audited session")
	}
	kinds := map[string]int{}
	for _, q := range sess.stmts {
		if strings.HasPrefix(q.Text, "INSERT INTO loopt") {
			kinds[q.Text[strings.Index(q.Text, "'"):]]++
			if strings.Contains(q.Text, "$1") && (len(q.Params) != 1 || len(q.Params[0].Value) == 0) {
				t.Fatalf("audited %q without its parameter: %+v", q.Text, q.Params)
			}
		}
	}
	inserts := 0
	for _, q := range sess.stmts {
		if strings.HasPrefix(q.Text, "INSERT INTO loopt") {
			inserts++
		}
	}
	if inserts != 250 || kinds["'simple')"] != 50 || kinds["'extended')"] != 50 || kinds["'prepared')"] != 50 || kinds["'batch')"] != 100 {
		t.Fatalf("audited %d INSERTs, want 250: 50 simple, 50 extended, 50 prepared, 100 in the batch (%v)", inserts, kinds)
	}
	done := 0
	for _, q := range sess.results {
		if q.Tag == "INSERT 0 1" {
			done++
		}
	}
	if done != 250 {
		t.Fatalf("%d INSERTs completed with INSERT 0 1 in the audit, want 250", done)
	}
	if !sess.ended || sess.end.EndReason != EndClientClosed {
		t.Fatalf("session end: ended %v, reason %q", sess.ended, sess.end.EndReason)
	}
}

// A client that asks for a large result and does not read it fills its
// socket: the loop must go on serving every other session meanwhile.
func TestEventLoopSlowReaderDoesNotStallOthers(t *testing.T) {
	h := loopHarness(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	stalled, _ := rawSession(t, h, map[string]string{"application_name": "loop-stalled"})
	q, _ := (&pgproto3.Query{String: "SELECT repeat('z', 1000) FROM generate_series(1, 200000)"}).Encode(nil)
	if _, err := stalled.Write(q); err != nil {
		t.Fatal(err)
	}
	// 200 MB are on their way; this client reads none of it for now.
	c := h.connect(t, testenv.ScramUser, "orders")
	for i := 0; i < 200; i++ {
		qctx, qcancel := context.WithTimeout(ctx, 5*time.Second)
		var v int
		err := c.QueryRow(qctx, "SELECT $1::int", i).Scan(&v)
		qcancel()
		if err != nil || v != i {
			t.Fatalf("query %d beside a stalled session: %d, %v", i, v, err)
		}
	}
	if loop, all := loopSessions(h); loop != 2 || all != 2 {
		t.Fatalf("sessions on the event loop: %d of %d, want 2 of 2", loop, all)
	}
	// The stalled client now reads all of it: nothing lost.
	fe := pgproto3.NewFrontend(stalled, stalled)
	_ = stalled.SetReadDeadline(time.Now().Add(60 * time.Second))
	rows := 0
	for {
		m, err := fe.Receive()
		if err != nil {
			t.Fatalf("after %d rows: %v", rows, err)
		}
		if d, ok := m.(*pgproto3.DataRow); ok {
			if len(d.Values) != 1 || len(d.Values[0]) != 1000 {
				t.Fatalf("row %d: %d values", rows, len(d.Values))
			}
			rows++
		}
		if _, ok := m.(*pgproto3.ReadyForQuery); ok {
			break
		}
	}
	if rows != 200000 {
		t.Fatalf("stalled client read %d rows, want 200000", rows)
	}
	// All sent: no session keeps a buffer for what its client was slow
	// to read.
	held := func() (n int) {
		h.srv.mu.Lock()
		defer h.srv.mu.Unlock()
		for sess := range h.srv.sessions {
			if lc, ok := sess.client.(*loopConn); ok {
				lc.mu.Lock()
				n += cap(lc.unsent)
				lc.mu.Unlock()
			}
		}
		return n
	}
	for deadline := time.Now().Add(2 * time.Second); held() != 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the sessions keep %d bytes of unsent buffer after everything was sent", held())
		}
	}
}

// Many sessions at once through the one loop thread, each checking its
// own answers: no answer reaches the wrong client.
func TestEventLoopConcurrentSessions(t *testing.T) {
	h := loopHarness(t)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	errs := make(chan error, 32)
	for w := 0; w < 32; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			c, err := pgx.Connect(ctx, h.dsn(testenv.ScramUser, "orders"))
			if err != nil {
				errs <- err
				return
			}
			defer c.Close(context.Background())
			for i := 0; i < 100; i++ {
				var s string
				want := fmt.Sprintf("%d-%d", w, i)
				mode := []pgx.QueryExecMode{pgx.QueryExecModeSimpleProtocol, pgx.QueryExecModeExec, pgx.QueryExecModeCacheStatement}[i%3]
				if err := c.QueryRow(ctx, "SELECT $1::text", mode, want).Scan(&s); err != nil || s != want {
					errs <- fmt.Errorf("worker %d query %d: %q, %v", w, i, s, err)
					return
				}
			}
		}(w)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	waitNoSessions(t, h)
}

// The end of a session while its sockets are the loop's: the server going
// away mid-session, and a client leaving in the middle of a message.
func TestEventLoopSessionEnds(t *testing.T) {
	h := loopHarness(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	// The backend is terminated by the server: the client hears it.
	c := h.connect(t, testenv.ScramUser, "orders", "application_name=loop-killed")
	admin, err := h.pg.Admin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(ctx)
	if _, err := admin.Exec(ctx, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE '%loop-killed%'"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Exec(ctx, "SELECT 1"); err == nil {
		t.Fatal("a query on a terminated backend succeeded")
	}

	// A client that stops mid-message and shuts down its side.
	raw, _ := rawSession(t, h, map[string]string{"application_name": "loop-midmsg"})
	_, _ = raw.Write(append([]byte{'Q', 0, 0, 0x10, 0}, "insert into never_ran"...))
	raw.(*net.UnixConn).CloseWrite()
	_ = raw.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.Copy(io.Discard, raw); err != nil {
		t.Fatalf("client side not closed cleanly: %v", err)
	}
	h.pg.WaitBackendsGone(t, "loop-midmsg")
	waitNoSessions(t, h)
}

// loopPair is a connected pair of Unix sockets, one side on the loop.
func loopPair(t *testing.T) (*loopConn, net.Conn) {
	t.Helper()
	loop, err := sharedLoop()
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("unix", t.TempDir()+"/s")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	peer, err := net.Dial("unix", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { peer.Close() })
	c, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	lc, ok, err := loop.attach(c)
	if !ok || err != nil {
		t.Fatalf("attach: %v %v", ok, err)
	}
	t.Cleanup(func() { lc.Close() })
	return lc, peer
}

// loopConn keeps a net.Conn's promises: deadlines, Close waking a blocked
// Read, writes in order when the peer is slow, EOF.
func TestLoopConnIsANetConn(t *testing.T) {
	lc, peer := loopPair(t)
	buf := make([]byte, 64)

	// A read deadline in the past, then in the near future.
	_ = lc.SetReadDeadline(time.Unix(1, 0))
	if _, err := lc.Read(buf); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read past the deadline: %v", err)
	}
	_ = lc.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	start := time.Now()
	if _, err := lc.Read(buf); !errors.Is(err, os.ErrDeadlineExceeded) || time.Since(start) < 40*time.Millisecond {
		t.Fatalf("read with a 50 ms deadline: %v after %v", err, time.Since(start))
	}
	_ = lc.SetReadDeadline(time.Time{})

	// A blocked Read gets what the peer writes.
	go func() { time.Sleep(20 * time.Millisecond); _, _ = peer.Write([]byte("hello")) }()
	if n, err := lc.Read(buf); err != nil || string(buf[:n]) != "hello" {
		t.Fatalf("read %q, %v", buf[:n], err)
	}

	// 8 MB written while the peer reads slowly arrive whole and in order.
	want := make([]byte, 8<<20)
	for i := range want {
		want[i] = byte(i * 7)
	}
	got := make(chan []byte)
	go func() {
		var all []byte
		b := make([]byte, 1500)
		for len(all) < len(want) {
			n, err := peer.Read(b)
			if err != nil {
				break
			}
			all = append(all, b[:n]...)
			if len(all)%(1<<20) < 1500 {
				time.Sleep(5 * time.Millisecond)
			}
		}
		got <- all
	}()
	// Half through writeInline (what the loop thread does), the rest
	// through Write, which waits behind it.
	if err := lc.writeInline(want[:4<<20]); err != nil && err != errWouldBlock {
		t.Fatal(err)
	}
	if n, err := lc.Write(want[4<<20:]); err != nil || n != 4<<20 {
		t.Fatalf("write: %d, %v", n, err)
	}
	if all := <-got; !bytes.Equal(all, want) {
		t.Fatalf("peer read %d bytes, not the 8 MB written in order", len(all))
	}

	// A write deadline with a peer that reads nothing.
	_ = lc.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
	if _, err := lc.Write(make([]byte, 16<<20)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("write to a peer that does not read: %v", err)
	}

	// Close wakes a blocked Read with net.ErrClosed.
	errc := make(chan error, 1)
	_ = lc.SetWriteDeadline(time.Time{})
	go func() { _, err := lc.Read(buf); errc <- err }()
	time.Sleep(20 * time.Millisecond)
	lc.Close()
	select {
	case err := <-errc:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("read after Close: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not wake the blocked Read")
	}
}

// The peer's end of the stream reads as io.EOF after the data before it.
func TestLoopConnEOF(t *testing.T) {
	lc, peer := loopPair(t)
	_, _ = peer.Write([]byte("last words"))
	peer.(*net.UnixConn).CloseWrite()
	b, err := io.ReadAll(lc)
	if err != nil || string(b) != "last words" {
		t.Fatalf("read %q, %v", b, err)
	}
}

// A message larger than a standard read, answered to a client that does
// not read it, stays in the pump's counted buffer (limits.buffer_memory)
// until the client has read it: the loop keeps no uncounted copy of it.
func TestEventLoopStalledPeerMemoryCounted(t *testing.T) {
	h := loopHarness(t)
	stalled, fe := rawSession(t, h, map[string]string{"application_name": "loop-counted"})
	// The server's ErrorResponse repeats the value: about 1 MB, an
	// inspected message (the upstream pump holds it whole).
	value := strings.Repeat("9x", 512<<10)
	q, _ := (&pgproto3.Query{String: "SELECT '" + value + "'::int"}).Encode(nil)
	if _, err := stalled.Write(q); err != nil {
		t.Fatal(err)
	}
	unsent := func() (n int) {
		for _, l := range loops() {
			l.mu.Lock()
			for _, c := range l.conns {
				c.mu.Lock()
				n += len(c.unsent)
				c.mu.Unlock()
			}
			l.mu.Unlock()
		}
		return n
	}
	// While the client reads nothing, the rest of the answer is held in a
	// counted buffer, and at most a standard read waits uncounted.
	deadline := time.Now().Add(20 * time.Second)
	for h.srv.budget.inUse.Load() < 512<<10 {
		if time.Now().After(deadline) {
			t.Fatalf("buffer memory in use %d B while a 1 MB answer waits for its client; unsent %d B",
				h.srv.budget.inUse.Load(), unsent())
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond)
	if in, u := h.srv.budget.inUse.Load(), unsent(); in < 512<<10 || u > 2*relayBufSize {
		t.Fatalf("a 1 MB answer waiting for its client: %d B counted, %d B kept uncounted (want ≥ 512 KiB, ≤ %d)", in, u, 2*relayBufSize)
	}
	// The client reads it all.
	_ = stalled.SetReadDeadline(time.Now().Add(30 * time.Second))
	for {
		m, err := fe.Receive()
		if err != nil {
			t.Fatal(err)
		}
		if e, ok := m.(*pgproto3.ErrorResponse); ok {
			if e.Code != "22P02" || !strings.Contains(e.Message, value) {
				t.Fatalf("error %s with a message of %d bytes", e.Code, len(e.Message))
			}
		}
		if _, ok := m.(*pgproto3.ReadyForQuery); ok {
			break
		}
	}
	stalled.Close()
	waitNoSessions(t, h)
	if in := h.srv.budget.inUse.Load(); in != 0 {
		t.Fatalf("buffer memory still in use after the session: %d B", in)
	}
}

// A socket that never runs dry does not keep the loop thread: after
// inlineReads reads the pump yields and is kicked to go on.
func TestEventLoopYieldsToOtherSessions(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for SO_SNDBUFFORCE (a send buffer that holds 4 MB); CI runs as root")
	}
	lc, peer := loopPair(t)
	raw, err := peer.(*net.UnixConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	if err := raw.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, 8<<20) }); err != nil || serr != nil {
		t.Fatal(err, serr)
	}
	// 4 MB wait in the socket before the pump first looks: one wake-up
	// could read 128 full reads.
	const total = 4 << 20
	if n, err := peer.Write(make([]byte, total)); err != nil || n != total {
		t.Fatalf("prefill: %d, %v", n, err)
	}
	var budget bufferBudget
	rd := newRelayReader(lc, &budget)
	defer rd.release()
	p := &inlinePump{lc: lc, peer: lc, wake: make(chan pumpEvent, 1)}
	var mu sync.Mutex
	var runs []int
	got, cur := 0, 0
	done := make(chan struct{})
	closeDone := sync.OnceFunc(func() { close(done) })
	var hmu sync.Mutex // held by a wake-up; stopped: the test took rd back
	stopped := false
	p.handler = func() {
		hmu.Lock()
		defer hmu.Unlock()
		if stopped {
			return
		}
		cur = 0
		p.onReadable(rd, func(m int) (bool, error) {
			cur++
			got += rd.n
			rd.consume(rd.n)
			return false, nil
		})
		mu.Lock()
		runs = append(runs, cur)
		mu.Unlock()
		if got == total {
			closeDone() // after this wake-up is counted
		}
	}
	p.inline = true
	lc.setInline(&p.handler)
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatalf("read %d of %d bytes", got, total)
	}
	lc.setInline(nil)
	hmu.Lock() // a wake-up that loaded the handler before that has ended
	stopped = true
	hmu.Unlock()
	mu.Lock()
	defer mu.Unlock()
	most := 0
	for _, r := range runs {
		most = max(most, r)
	}
	if most > inlineReads || len(runs) < total/relayBufSize/inlineReads {
		t.Fatalf("wake-ups %d, most reads in one %d (want at most %d)", len(runs), most, inlineReads)
	}
}

// With listen.event_loop_threads at 2, sessions are spread over two event
// loops, a session's two sockets on the same loop.
func TestEventLoopSpreadsSessions(t *testing.T) {
	h := newHarness(t, func(_ *harness, c *Config) { c.Listen.EventLoop, c.Listen.EventLoopThreads = true, 2 })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	const n = 6
	for range n {
		c := h.connect(t, testenv.ScramUser, "orders")
		if err := c.Ping(ctx); err != nil {
			t.Fatal(err)
		}
	}
	// Serve started them before the first session.
	if got := len(loops()); got < 2 {
		t.Fatalf("%d event loops running, want at least 2", got)
	}
	used := map[*eventLoop]int{}
	h.srv.mu.Lock()
	for sess := range h.srv.sessions {
		a, _ := sess.client.(*loopConn)
		b, _ := sess.up.conn.(*loopConn)
		if a == nil || b == nil || a.loop != b.loop {
			h.srv.mu.Unlock()
			t.Fatalf("a session's sockets are not on one loop: %v, %v", a, b)
		}
		used[a.loop]++
	}
	h.srv.mu.Unlock()
	if want := min(len(loops()), n); len(used) != want {
		t.Fatalf("%d sessions on %d of %d loops, want %d: %v", n, len(used), len(loops()), want, used)
	}
}

// listen.event_loop_nice gives the loops' threads, and only them, that nice
// value.
func TestEventLoopNice(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (CAP_SYS_NICE) for a negative nice value; CI runs as root")
	}
	t.Cleanup(func() {
		if err := setLoopsNice(0); err != nil {
			t.Error(err)
		}
	})
	h := newHarness(t, func(_ *harness, c *Config) {
		c.Listen.EventLoop, c.Listen.EventLoopThreads, c.Listen.EventLoopNice = true, 2, -7
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c := h.connect(t, testenv.ScramUser, "orders")
	if err := c.Ping(ctx); err != nil {
		t.Fatal(err)
	}
	ls := loops()
	if len(ls) < 2 {
		t.Fatalf("%d event loops, want at least 2", len(ls))
	}
	loopTIDs := map[int]bool{}
	for _, l := range ls {
		loopTIDs[l.tid] = true
		if got := threadNice(t, l.tid); got != -7 {
			t.Errorf("loop thread %d has nice %d, want -7", l.tid, got)
		}
	}
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		t.Fatal(err)
	}
	others := 0
	for _, e := range tasks {
		tid, err := strconv.Atoi(e.Name())
		if err != nil || loopTIDs[tid] {
			continue
		}
		got := threadNice(t, tid)
		if got == -100 {
			continue // exited meanwhile
		}
		others++
		if got != 0 {
			t.Errorf("thread %d, not a loop's, has nice %d, want 0: only the loops' threads change", tid, got)
		}
	}
	if others == 0 {
		t.Fatal("no thread besides the loops' to compare with")
	}
}

// threadNice reads the nice value of one of this process's threads; -100
// when the thread has exited.
func threadNice(t *testing.T, tid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/self/task/%d/stat", tid))
	if errors.Is(err, os.ErrNotExist) {
		return -100
	}
	if err != nil {
		t.Fatal(err)
	}
	// Fields after the command name (in parentheses): state is field 3,
	// nice field 19.
	rest := string(b[bytes.LastIndexByte(b, ')')+2:])
	f := strings.Fields(rest)
	n, err := strconv.Atoi(f[19-3])
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// When setpriority is refused (no CAP_SYS_NICE, an RLIMIT_NICE that does
// not allow it), setLoopsNice returns the error and the loops keep their
// priority. Capabilities are per thread: this drops CAP_SYS_NICE from the
// calling thread only, which is then discarded.
func TestEventLoopNiceRefused(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to start with CAP_SYS_NICE and drop it; CI runs as root")
	}
	// An RLIMIT_NICE of 0 allows no lowering without CAP_SYS_NICE (the
	// soft limit may always be lowered, and raised back to the hard one).
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NICE, &rl); err != nil {
		t.Fatal(err)
	}
	if err := unix.Setrlimit(unix.RLIMIT_NICE, &unix.Rlimit{Cur: 0, Max: rl.Max}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := unix.Setrlimit(unix.RLIMIT_NICE, &rl); err != nil {
			t.Error(err)
		}
	})
	if err := startLoops(1); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := setLoopsNice(0); err != nil {
			t.Error(err)
		}
	})
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
		hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
		var data [2]unix.CapUserData
		if err := unix.Capget(&hdr, &data[0]); err != nil {
			done <- err
			return
		}
		data[0].Effective &^= 1 << unix.CAP_SYS_NICE
		if err := unix.Capset(&hdr, &data[0]); err != nil {
			done <- err
			return
		}
		err := setLoopsNice(-5)
		if err == nil {
			done <- errors.New("setLoopsNice(-5) without CAP_SYS_NICE succeeded")
			return
		}
		if !errors.Is(err, unix.EACCES) && !errors.Is(err, unix.EPERM) {
			done <- fmt.Errorf("setLoopsNice(-5) without CAP_SYS_NICE: %v, want EACCES or EPERM", err)
			return
		}
		done <- nil
	}()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	for _, l := range loops() {
		if got := threadNice(t, l.tid); got != 0 {
			t.Errorf("loop thread %d has nice %d after a refused change, want 0", l.tid, got)
		}
	}
}

// sharedLoop returns the first event loop (starting it if need be), for
// tests that drive one loop directly.
func sharedLoop() (*eventLoop, error) {
	if err := startLoops(1); err != nil {
		return nil, err
	}
	return loops()[0], nil
}
