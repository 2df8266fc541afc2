package broker

import (
	"context"
	"encoding/binary"
	"log/slog"
	"net"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"
)

// countingObserver audits nothing but touches every event, so the relay's
// own allocations are what the benchmark measures.
type countingObserver struct {
	NopObserver
	queries, done atomic.Int64
}

func (o *countingObserver) Statements(_ context.Context, qs []*QueryEvent) error {
	for _, q := range qs {
		if len(q.Text) == 0 {
			panic("query without text")
		}
		o.queries.Add(1)
	}
	return nil
}

func (o *countingObserver) Result(_ context.Context, q *QueryEvent) {
	o.done.Add(1)
}

// socketPair returns two connected Unix stream sockets, as the relay sees
// them in production (descriptors it can wait on without a buffer).
func socketPair(tb testing.TB) (net.Conn, net.Conn) {
	tb.Helper()
	path := filepath.Join(tb.TempDir(), "s")
	ln, err := net.Listen("unix", path)
	if err != nil {
		tb.Fatal(err)
	}
	defer ln.Close()
	ch := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		ch <- c
	}()
	a, err := net.Dial("unix", path)
	if err != nil {
		tb.Fatal(err)
	}
	return a, <-ch
}

// relayFixture runs one session's relay between an in-process client and a
// scripted upstream that answers every Query (or Sync) with one row.
type relayFixture struct {
	client net.Conn
	obs    *countingObserver
	done   chan struct{}
}

func newRelayFixture(tb testing.TB) *relayFixture {
	tb.Helper()
	cl, clSrv := socketPair(tb)
	upCli, upSrv := socketPair(tb)
	obs := &countingObserver{}
	srv := &Server{obs: obs, log: slog.New(slog.DiscardHandler)}
	srv.state.Store(&serverState{cfg: Config{}})
	sess := &session{srv: srv, log: srv.log, ctx: context.Background(), client: clSrv, up: &upstreamConn{conn: upCli}, obs: obs}
	f := &relayFixture{client: cl, obs: obs, done: make(chan struct{})}
	go fakeBackend(upSrv)
	go func() { defer close(f.done); sess.run() }()
	tb.Cleanup(func() { cl.Close(); <-f.done })
	return f
}

// fakeBackend answers Query and Sync with a result set and ReadyForQuery.
func fakeBackend(c net.Conn) {
	defer c.Close()
	var reply []byte
	reply = append(reply, beMsg('T', rowDesc())...)
	reply = append(reply, beMsg('D', []byte{0, 1, 0, 0, 0, 4, '4', '2', '4', '2'})...)
	reply = append(reply, beMsg('C', []byte("SELECT 1\x00"))...)
	reply = append(reply, beMsg('Z', []byte{'I'})...)
	extReply := append(append(beMsg('1', nil), beMsg('2', nil)...), reply...)
	buf := make([]byte, 64<<10)
	n := 0
	for {
		m, err := c.Read(buf[n:])
		if err != nil {
			return
		}
		n += m
		i := 0
		for n-i >= 5 {
			l := int(binary.BigEndian.Uint32(buf[i+1:]))
			if n-i < 1+l {
				break
			}
			switch buf[i] {
			case 'Q':
				if _, err := c.Write(reply); err != nil {
					return
				}
			case 'S':
				if _, err := c.Write(extReply); err != nil {
					return
				}
			case 'X':
				return
			}
			i += 1 + l
		}
		copy(buf, buf[i:n])
		n -= i
	}
}

func rowDesc() []byte {
	b := []byte{0, 1}
	b = append(b, "abalance\x00"...)
	b = binary.BigEndian.AppendUint32(b, 0)
	b = binary.BigEndian.AppendUint16(b, 0)
	b = binary.BigEndian.AppendUint32(b, 23)
	b = binary.BigEndian.AppendUint16(b, 4)
	b = binary.BigEndian.AppendUint32(b, 0xffffffff)
	return binary.BigEndian.AppendUint16(b, 0)
}

func beMsg(t byte, body []byte) []byte {
	b := []byte{t}
	b = binary.BigEndian.AppendUint32(b, uint32(4+len(body)))
	return append(b, body...)
}

// roundTrip sends req and reads until ReadyForQuery.
func roundTrip(tb testing.TB, c net.Conn, req []byte, buf []byte) {
	if _, err := c.Write(req); err != nil {
		tb.Fatal(err)
	}
	n := 0
	for {
		m, err := c.Read(buf[n:])
		if err != nil {
			tb.Fatal(err)
		}
		n += m
		if n >= 6 && buf[n-6] == 'Z' {
			return
		}
	}
}

// BenchmarkRelay measures one statement's round trip through the relay
// (client → audit → upstream → completion → client) on Unix sockets, with
// an observer that does no work of its own: allocs/op is the relay's.
func BenchmarkRelay(b *testing.B) {
	simple := beMsg('Q', []byte("SELECT abalance FROM pgbench_accounts WHERE aid = 4242;\x00"))
	var ext []byte
	ext = append(ext, beMsg('P', []byte("\x00SELECT abalance FROM pgbench_accounts WHERE aid = $1;\x00\x00\x00"))...)
	ext = append(ext, beMsg('B', []byte("\x00\x00\x00\x00\x00\x01\x00\x00\x00\x044242\x00\x00"))...)
	ext = append(ext, beMsg('D', []byte("P\x00"))...)
	ext = append(ext, beMsg('E', []byte("\x00\x00\x00\x00\x00"))...)
	ext = append(ext, beMsg('S', nil)...)
	for _, bc := range []struct {
		name string
		req  []byte
	}{{"simple", simple}, {"extended", ext}} {
		b.Run(bc.name, func(b *testing.B) {
			f := newRelayFixture(b)
			buf := make([]byte, 4096)
			for range 100 { // warm up: pools, maps, interned tags
				roundTrip(b, f.client, bc.req, buf)
			}
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				roundTrip(b, f.client, bc.req, buf)
			}
			b.StopTimer()
			// The client may read an answer before the relay has reported
			// the statement's completion (it forwards, then reports).
			for deadline := time.Now().Add(5 * time.Second); f.obs.queries.Load() != f.obs.done.Load() && time.Now().Before(deadline); {
				time.Sleep(time.Millisecond)
			}
			if f.obs.queries.Load() != f.obs.done.Load() {
				b.Fatalf("%d statements audited, %d completed", f.obs.queries.Load(), f.obs.done.Load())
			}
		})
	}
}
