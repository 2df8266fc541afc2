package broker

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestRelayStress runs many concurrent sessions of many short statements
// through the relay — simple queries, pipelined simple queries, pipelined
// extended batches, messages split into tiny writes and messages larger
// than the relay buffer — with session churn, at GOMAXPROCS 1 and 2. Every
// answer must come back, be the right one, and every audited statement must
// carry its own text and parameters (not another statement's, not another
// session's). A client waiting more than 10 s for an answer fails the test
// with a goroutine dump: that is a relay hang.
func TestRelayStress(t *testing.T) {
	d := 3 * time.Second
	if testing.Short() {
		d = time.Second
	}
	for _, procs := range []int{1, 2} {
		t.Run("GOMAXPROCS="+strconv.Itoa(procs), func(t *testing.T) {
			defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(procs))
			relayStress(t, 24, d)
		})
	}
}

// stressObserver checks what the relay hands the audit: the text and
// parameters of each statement, in order, per session.
type stressObserver struct {
	NopObserver
	mu   sync.Mutex
	next map[string]int // session id → next expected statement number
	errs []string
	done map[string]int
}

func (o *stressObserver) fail(format string, args ...any) {
	o.mu.Lock()
	if len(o.errs) < 20 {
		o.errs = append(o.errs, fmt.Sprintf(format, args...))
	}
	o.mu.Unlock()
}

// check verifies that statement text/param says "<sid>:<n>" with n the
// session's next statement number.
func (o *stressObserver) check(s *SessionInfo, what string) {
	sid, n, ok := strings.Cut(what, ":")
	if !ok || sid != s.SessionID {
		o.fail("session %s: audited %q", s.SessionID, strings.Clone(what))
		return
	}
	k, err := strconv.Atoi(n)
	o.mu.Lock()
	want := o.next[s.SessionID]
	o.next[s.SessionID] = want + 1
	o.mu.Unlock()
	if err != nil || k != want {
		o.fail("session %s: audited statement %q, want number %d", s.SessionID, strings.Clone(what), want)
	}
}

func (o *stressObserver) Query(_ context.Context, s *SessionInfo, q *QueryEvent) error {
	if q.Extended {
		if len(q.Params) != 1 || !strings.HasPrefix(q.Text, "select $1::text /*") {
			o.fail("session %s: extended statement %q with %d params", s.SessionID, strings.Clone(q.Text), len(q.Params))
			return nil
		}
		if q.BindOnly {
			// A Bind read apart from its Execute: audited on its own too.
			if sid, _, _ := strings.Cut(string(q.Params[0].Value), ":"); sid != s.SessionID {
				o.fail("session %s: bind of %q", s.SessionID, q.Params[0].Value)
			}
			return nil
		}
		o.check(s, string(q.Params[0].Value))
		return nil
	}
	// select '<sid>:<n>' [padding]
	rest, ok := strings.CutPrefix(q.Text, "select '")
	i := strings.IndexByte(rest, '\'')
	if !ok || i < 0 {
		o.fail("session %s: simple statement %.60q", s.SessionID, strings.Clone(q.Text))
		return nil
	}
	o.check(s, rest[:i])
	return nil
}

// stressSessionObserver is one session's SessionObserver of a stressObserver.
type stressSessionObserver struct {
	NopObserver
	o *stressObserver
	s *SessionInfo
}

func (so stressSessionObserver) Statements(ctx context.Context, qs []*QueryEvent) error {
	for _, q := range qs {
		_ = so.o.Query(ctx, so.s, q)
	}
	return nil
}

func (so stressSessionObserver) Result(ctx context.Context, q *QueryEvent) {
	so.o.QueryDone(ctx, so.s, q)
}

func (o *stressObserver) QueryDone(_ context.Context, s *SessionInfo, q *QueryEvent) {
	if !q.Success {
		o.fail("session %s: statement %d failed: %s %s", s.SessionID, q.Index, q.Code, q.Error)
	}
	if q.BindOnly {
		return
	}
	o.mu.Lock()
	o.done[s.SessionID]++
	o.mu.Unlock()
}

// echoBackend answers like a server: ParseComplete, BindComplete, a DataRow
// echoing the simple query's quoted literal or the bound parameter,
// CommandComplete, and ReadyForQuery at Sync / after a Query.
func echoBackend(c net.Conn) {
	defer c.Close()
	buf := make([]byte, 0, 64<<10)
	tmp := make([]byte, 32<<10)
	var out []byte
	var bound []byte
	row := func(v []byte) {
		body := binary.BigEndian.AppendUint16(nil, 1)
		body = binary.BigEndian.AppendUint32(body, uint32(len(v)))
		out = append(out, beMsg('D', append(body, v...))...)
		out = append(out, beMsg('C', []byte("SELECT 1\x00"))...)
	}
	for {
		m, err := c.Read(tmp)
		if err != nil {
			return
		}
		buf = append(buf, tmp[:m]...)
		i := 0
		out = out[:0]
		for len(buf)-i >= 5 {
			l := int(binary.BigEndian.Uint32(buf[i+1:]))
			if len(buf)-i < 1+l {
				break
			}
			body := buf[i+5 : i+1+l]
			switch buf[i] {
			case 'Q':
				s := string(body)
				a := strings.IndexByte(s, '\'')
				b := strings.IndexByte(s[a+1:], '\'')
				row([]byte(s[a+1 : a+1+b]))
				out = append(out, beMsg('Z', []byte{'I'})...)
			case 'P':
				out = append(out, beMsg('1', nil)...)
			case 'B':
				// portal "", statement "", 0 formats, 1 param, len, value, 0 result formats
				_, rest, _ := cbytes(body)
				_, rest, _ = cbytes(rest)
				rest = rest[2+2:]
				n := int(binary.BigEndian.Uint32(rest))
				bound = append(bound[:0], rest[4:4+n]...)
				out = append(out, beMsg('2', nil)...)
			case 'E':
				row(bound)
			case 'S':
				out = append(out, beMsg('Z', []byte{'I'})...)
			case 'X':
				return
			}
			i += 1 + l
		}
		buf = append(buf[:0], buf[i:]...)
		if len(out) > 0 {
			if _, err := c.Write(out); err != nil {
				return
			}
		}
	}
}

func relayStress(t *testing.T, workers int, d time.Duration) {
	obs := &stressObserver{next: map[string]int{}, done: map[string]int{}}
	srv := &Server{obs: obs, log: slog.New(slog.DiscardHandler)}
	srv.state.Store(&serverState{cfg: Config{}})
	deadline := time.Now().Add(d)
	var wg sync.WaitGroup
	var hung sync.Once
	errc := make(chan error, workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 7))
			for s := 0; time.Now().Before(deadline); s++ {
				sid := fmt.Sprintf("w%ds%d", w, s)
				if err := stressSession(t, srv, sid, rng); err != nil {
					if os.IsTimeout(err) || strings.Contains(err.Error(), "timeout") {
						hung.Do(func() {
							var b bytes.Buffer
							_ = pprof.Lookup("goroutine").WriteTo(&b, 1)
							t.Logf("goroutines at the hang:\n%s", b.String())
						})
					}
					errc <- fmt.Errorf("session %s: %w", sid, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Error(err)
	}
	obs.mu.Lock()
	defer obs.mu.Unlock()
	for _, e := range obs.errs {
		t.Error(e)
	}
	total := 0
	for sid, n := range obs.next {
		if obs.done[sid] != n {
			t.Errorf("session %s: %d statements audited, %d completed", sid, n, obs.done[sid])
		}
		total += n
	}
	t.Logf("%d sessions, %d statements", len(obs.next), total)
}

// stressSession runs one session of a random number of statements of random
// shapes and checks every answer.
func stressSession(t *testing.T, srv *Server, sid string, rng *rand.Rand) error {
	cl, clSrv := socketPair(t)
	upCli, upSrv := socketPair(t)
	sess := &session{srv: srv, log: srv.log, ctx: context.Background(), client: clSrv, up: &upstreamConn{conn: upCli}}
	sess.info.SessionID = sid
	sess.obs = stressSessionObserver{o: srv.obs.(*stressObserver), s: &sess.info}
	srv.obs.(*stressObserver).mu.Lock()
	srv.obs.(*stressObserver).next[sid] = 0
	srv.obs.(*stressObserver).mu.Unlock()
	done := make(chan struct{})
	go echoBackend(upSrv)
	go func() { defer close(done); sess.run() }()
	defer func() { cl.Close(); <-done }()

	n := 0 // next statement number
	rd := &msgReader{c: cl}
	statements := 1 + rng.IntN(40)
	for n < statements {
		var req []byte
		var want []string
		switch k := rng.IntN(10); {
		case k < 4: // one simple query
			v := sid + ":" + strconv.Itoa(n)
			n++
			req = beMsg('Q', []byte("select '"+v+"'\x00"))
			want = append(want, v, "Z")
		case k < 6: // pipelined simple queries
			for range 2 + rng.IntN(6) {
				v := sid + ":" + strconv.Itoa(n)
				n++
				req = append(req, beMsg('Q', []byte("select '"+v+"'\x00"))...)
				want = append(want, v, "Z")
			}
		case k < 9: // an extended batch: Parse once, then Bind/Execute per statement, one Sync
			req = beMsg('P', []byte("\x00select $1::text /*"+sid+"*/\x00\x00\x00"))
			for range 1 + rng.IntN(6) {
				v := sid + ":" + strconv.Itoa(n)
				n++
				b := []byte("\x00\x00\x00\x00\x00\x01")
				b = binary.BigEndian.AppendUint32(b, uint32(len(v)))
				b = append(b, v...)
				b = append(b, 0, 0)
				req = append(req, beMsg('B', b)...)
				req = append(req, beMsg('E', []byte("\x00\x00\x00\x00\x00"))...)
				want = append(want, v)
			}
			req = append(req, beMsg('S', nil)...)
			want = append(want, "Z")
		default: // a statement larger than the relay buffer
			v := sid + ":" + strconv.Itoa(n)
			n++
			req = beMsg('Q', []byte("select '"+v+"' /*"+strings.Repeat("x", relayBufSize+rng.IntN(relayBufSize))+"*/\x00"))
			want = append(want, v, "Z")
		}
		if err := stressWrite(cl, req, rng); err != nil {
			return err
		}
		for _, w := range want {
			if err := rd.expect(w); err != nil {
				return err
			}
		}
	}
	if rng.IntN(2) == 0 {
		_, _ = cl.Write(beMsg('X', nil))
	}
	return nil
}

// stressWrite sends req whole, or in small pieces with pauses, so the relay
// sees partial messages.
func stressWrite(c net.Conn, req []byte, rng *rand.Rand) error {
	_ = c.SetWriteDeadline(time.Now().Add(10 * time.Second))
	if rng.IntN(4) != 0 {
		_, err := c.Write(req)
		return err
	}
	for len(req) > 0 {
		k := min(len(req), 1+rng.IntN(9))
		if _, err := c.Write(req[:k]); err != nil {
			return err
		}
		req = req[k:]
		if rng.IntN(3) == 0 {
			runtime.Gosched()
		}
	}
	return nil
}

// msgReader reads backend messages from the client's side.
type msgReader struct {
	c   net.Conn
	buf []byte
}

func (r *msgReader) next() (byte, []byte, error) {
	for {
		if len(r.buf) >= 5 {
			l := int(binary.BigEndian.Uint32(r.buf[1:]))
			if len(r.buf) >= 1+l {
				typ, body := r.buf[0], append([]byte(nil), r.buf[5:1+l]...)
				r.buf = r.buf[1+l:]
				return typ, body, nil
			}
		}
		var tmp [4096]byte
		_ = r.c.SetReadDeadline(time.Now().Add(10 * time.Second))
		m, err := r.c.Read(tmp[:])
		if m == 0 && err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return 0, nil, err
		}
		r.buf = append(r.buf, tmp[:m]...)
	}
}

// expect reads the next result: a DataRow with value w (then its
// CommandComplete), or ReadyForQuery for "Z".
func (r *msgReader) expect(w string) error {
	for {
		typ, body, err := r.next()
		if err != nil {
			return fmt.Errorf("waiting for %q: %w", w, err)
		}
		switch typ {
		case '1', '2', 'C':
			continue
		case 'Z':
			if w != "Z" {
				return fmt.Errorf("ReadyForQuery, want %q", w)
			}
			return nil
		case 'D':
			got := string(body[6:])
			if got != w {
				return fmt.Errorf("row %q, want %q", got, w)
			}
			return nil
		default:
			return fmt.Errorf("message %q, want %q", typ, w)
		}
	}
}
