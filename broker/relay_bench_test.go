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

// StageStatements and CommitStatements: the event loop's split of
// Statements (StatementStager), so that the -loop cases stage.
func (o *countingObserver) StageStatements(ctx context.Context, qs []*QueryEvent) {
	_ = o.Statements(ctx, qs)
}
func (o *countingObserver) CommitStatements(context.Context) error { return nil }

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
	return newRelayFixtureFor(tb, UpstreamConfig{}, false)
}

// newRelayFixtureFor: with loop, pgward's two sockets are on the event
// loop (listen.event_loop).
func newRelayFixtureFor(tb testing.TB, ucfg UpstreamConfig, loop bool) *relayFixture {
	tb.Helper()
	cl, clSrv := socketPair(tb)
	upCli, upSrv := socketPair(tb)
	if loop {
		l, err := sharedLoop()
		if err != nil {
			tb.Fatal(err)
		}
		a, _, err := l.attach(clSrv)
		if err != nil {
			tb.Fatal(err)
		}
		u, _, err := l.attach(upCli)
		if err != nil {
			tb.Fatal(err)
		}
		clSrv, upCli = a, u
	}
	obs := &countingObserver{}
	srv := &Server{obs: obs, log: slog.New(slog.DiscardHandler)}
	srv.state.Store(&serverState{cfg: Config{}})
	sess := &session{srv: srv, log: srv.log, ctx: context.Background(), client: clSrv, up: &upstreamConn{conn: upCli}, obs: obs,
		ups: &upstream{cfg: ucfg}}
	f := &relayFixture{client: cl, obs: obs, done: make(chan struct{})}
	go fakeBackend(upSrv)
	go func() { defer close(f.done); sess.run() }()
	tb.Cleanup(func() { cl.Close(); <-f.done })
	return f
}

// fakeBackend answers as PostgreSQL does, message by message (a one-row
// result set for Query and Execute), with one write per read.
func fakeBackend(c net.Conn) {
	defer c.Close()
	row := append(beMsg('D', []byte{0, 1, 0, 0, 0, 4, '4', '2', '4', '2'}), beMsg('C', []byte("SELECT 1\x00"))...)
	ready := beMsg('Z', []byte{'I'})
	desc := beMsg('T', rowDesc())
	query := append(append(append([]byte(nil), desc...), row...), ready...)
	buf := make([]byte, 64<<10)
	var out []byte
	n := 0
	for {
		m, err := c.Read(buf[n:])
		if err != nil {
			return
		}
		n += m
		i := 0
		out = out[:0]
		for n-i >= 5 {
			l := int(binary.BigEndian.Uint32(buf[i+1:]))
			if n-i < 1+l {
				break
			}
			switch buf[i] {
			case 'Q':
				out = append(out, query...)
			case 'P':
				out = append(out, '1', 0, 0, 0, 4)
			case 'B':
				out = append(out, '2', 0, 0, 0, 4)
			case 'C':
				out = append(out, '3', 0, 0, 0, 4)
			case 'D':
				out = append(out, desc...)
			case 'E':
				out = append(out, row...)
			case 'S':
				out = append(out, ready...)
			case 'X':
				return
			}
			i += 1 + l
		}
		if len(out) > 0 {
			if _, err := c.Write(out); err != nil {
				return
			}
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
	// prepared: a named statement prepared once, then Bind/Execute/Sync
	// (pgbench -M prepared). "verified" is the default (verify.go: pgward
	// sends Close+Parse of its own statement with the audited text before
	// the Bind, and takes their answers out); "trusted" is
	// trust_named_statements.
	prepare := append(beMsg('P', []byte("s1\x00SELECT abalance FROM pgbench_accounts WHERE aid = $1;\x00\x00\x01\x00\x00\x00\x17")), beMsg('S', nil)...)
	var prep []byte
	prep = append(prep, beMsg('B', []byte("\x00s1\x00\x00\x00\x00\x01\x00\x00\x00\x044242\x00\x00"))...)
	prep = append(prep, beMsg('E', []byte("\x00\x00\x00\x00\x00"))...)
	prep = append(prep, beMsg('S', nil)...)
	for _, bc := range []struct {
		name  string
		setup []byte
		req   []byte
		trust bool
		loop  bool
	}{{"simple", nil, simple, false, false}, {"extended", nil, ext, false, false},
		{"prepared-verified", prepare, prep, false, false}, {"prepared-trusted", prepare, prep, true, false},
		{"simple-loop", nil, simple, false, true}, {"extended-loop", nil, ext, false, true},
		{"prepared-verified-loop", prepare, prep, false, true}} {
		b.Run(bc.name, func(b *testing.B) {
			f := newRelayFixtureFor(b, UpstreamConfig{TrustNamedStatements: bc.trust}, bc.loop)
			buf := make([]byte, 4096)
			if bc.setup != nil {
				roundTrip(b, f.client, bc.setup, buf)
			}
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
