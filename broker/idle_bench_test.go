package broker

import (
	"context"
	"encoding/binary"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/pgward/pgward/broker/secrets"
)

// TestIdleSessionMemory opens many idle sessions through one Server and
// reports pgward's memory per idle session (RSS delta / N; t.Logf), and
// asserts a generous bound. The upstream is a scripted fake in this process
// that completes the startup (cleartext password) and then holds each
// connection without a goroutine: the test is about pgward's memory, and
// 10,000 real Postgres backends (2-5 MB each) do not fit this machine.
// The delta also counts the test's own client and fake-server sockets, so it
// overstates pgward's share slightly.
//
// N is 10,000 (PGWARD_IDLE_SESSIONS overrides), 1,000 under -race (whose
// limit is 8,128 live goroutines) or -short.
func TestIdleSessionMemory(t *testing.T) {
	n := 10000
	if v, err := strconv.Atoi(os.Getenv("PGWARD_IDLE_SESSIONS")); err == nil && v > 0 {
		n = v
	}
	if raceEnabled || testing.Short() {
		n = min(n, 1000)
	}
	n = raiseNoFileFor(t, n)

	dir := t.TempDir()
	upPath := filepath.Join(dir, "up.sock")
	upLn, err := net.Listen("unix", upPath)
	if err != nil {
		t.Fatal(err)
	}
	var held []net.Conn
	var heldMu sync.Mutex
	go func() {
		for {
			c, err := upLn.Accept()
			if err != nil {
				return
			}
			go func() {
				if fakeStartup(c) != nil {
					c.Close()
					return
				}
				heldMu.Lock()
				held = append(held, c)
				heldMu.Unlock()
			}()
		}
	}()
	t.Cleanup(func() {
		upLn.Close()
		heldMu.Lock()
		for _, c := range held {
			c.Close()
		}
		heldMu.Unlock()
	})

	me := uint32(os.Getuid())
	cfg := Config{
		Listen:     ListenConfig{UnixDir: dir, Port: 5432},
		Upstreams:  map[string]UpstreamConfig{"fake": {Address: upPath, Auth: []string{"password"}}},
		Principals: map[string]Principal{"me": {Match: Selectors{UID: []uint32{me}}}},
		Grants:     []Grant{{Principal: "me", Upstream: "fake", Roles: []string{"app"}}},
	}
	srv, err := New(Options{
		Config:   cfg,
		Resolver: IdentityResolverFunc(func(context.Context, net.Conn) (Identity, error) { return Identity{UID: me, PID: 1}, nil }),
		Secrets: secrets.SourceFunc(func(context.Context, string, string) (secrets.Credential, error) {
			return secrets.Credential{Password: secrets.NewSecret("pw")}, nil
		}),
	})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("unix", filepath.Join(dir, ".s.PGSQL.5432"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, ln) }()

	// Warm up (pools, the first session's one-time allocations), then measure.
	warm := openIdle(t, ln.Addr().String(), 50)
	base := settledRSS()
	baseGo := runtime.NumGoroutine()
	clients := openIdle(t, ln.Addr().String(), n)
	after := settledRSS()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	per := float64(after-base) / float64(n)
	t.Logf("%d idle sessions: RSS %d -> %d KiB, %.1f KiB per idle session (incl. the test's client and fake-server sockets); goroutines +%d; heap in use %d KiB, stacks %d KiB",
		n, base>>10, after>>10, per/1024, runtime.NumGoroutine()-baseGo, ms.HeapInuse>>10, ms.StackInuse>>10)
	if srv.ActiveSessions() != n+len(warm) {
		t.Errorf("%d active sessions, want %d", srv.ActiveSessions(), n+len(warm))
	}
	if per > 64<<10 && !raceEnabled { // the race detector's shadow memory inflates RSS
		t.Errorf("%.1f KiB per idle session, want <= 64 KiB", per/1024)
	}
	// A session still works after all that idling.
	c := clients[0]
	if _, err := c.Write(beMsg('Q', []byte("select 1\x00"))); err != nil {
		t.Fatal(err)
	}
	for _, c := range append(clients, warm...) {
		c.Close()
	}
	cancel()
	shut, done := context.WithTimeout(context.Background(), 30*time.Second)
	defer done()
	_ = srv.Shutdown(shut)
	<-served
}

// fakeStartup plays a server's side of the startup with a cleartext password.
func fakeStartup(c net.Conn) error {
	var hdr [4]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil {
		return err
	}
	if _, err := io.CopyN(io.Discard, c, int64(binary.BigEndian.Uint32(hdr[:]))-4); err != nil {
		return err
	}
	if _, err := c.Write(beMsg('R', []byte{0, 0, 0, 3})); err != nil {
		return err
	}
	var ph [5]byte
	if _, err := io.ReadFull(c, ph[:]); err != nil {
		return err
	}
	if _, err := io.CopyN(io.Discard, c, int64(binary.BigEndian.Uint32(ph[1:]))-4); err != nil {
		return err
	}
	var out []byte
	out = append(out, beMsg('R', []byte{0, 0, 0, 0})...)
	out = append(out, beMsg('S', []byte("server_version\x0017\x00"))...)
	out = append(out, beMsg('K', []byte{0, 0, 0, 42, 1, 2, 3, 4})...)
	out = append(out, beMsg('Z', []byte{'I'})...)
	_, err := c.Write(out)
	return err
}

// openIdle logs n clients in and leaves them idle.
func openIdle(t *testing.T, path string, n int) []net.Conn {
	t.Helper()
	conns := make([]net.Conn, n)
	var wg sync.WaitGroup
	errs := make(chan error, 1)
	next := make(chan int)
	for range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 1024)
			for i := range next {
				c, err := net.Dial("unix", path)
				if err == nil {
					err = login(c, buf)
				}
				if err != nil {
					select {
					case errs <- err:
					default:
					}
					continue
				}
				conns[i] = c
			}
		}()
	}
	for i := range n {
		next <- i
	}
	close(next)
	wg.Wait()
	select {
	case err := <-errs:
		t.Fatalf("login: %v", err)
	default:
	}
	return conns
}

func login(c net.Conn, buf []byte) error {
	body := binary.BigEndian.AppendUint32(nil, 196608)
	body = append(body, "user\x00app\x00database\x00fake\x00\x00"...)
	pkt := binary.BigEndian.AppendUint32(nil, uint32(4+len(body)))
	if _, err := c.Write(append(pkt, body...)); err != nil {
		return err
	}
	_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
	n := 0
	for {
		m, err := c.Read(buf[n:])
		if err != nil {
			return err
		}
		n += m
		if n >= 6 && buf[n-6] == 'Z' {
			_ = c.SetReadDeadline(time.Time{})
			return nil
		}
		if buf[0] == 'E' {
			return io.ErrUnexpectedEOF
		}
	}
}

// settledRSS is VmRSS after a GC that returns what it can to the OS.
func settledRSS() int64 {
	runtime.GC()
	debug.FreeOSMemory()
	time.Sleep(100 * time.Millisecond)
	b, _ := os.ReadFile("/proc/self/status")
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "VmRSS:") {
			f := strings.Fields(l)
			kb, _ := strconv.ParseInt(f[1], 10, 64)
			return kb << 10
		}
	}
	return 0
}

// raiseNoFileFor raises RLIMIT_NOFILE for n sessions (4 descriptors each in
// this process) and returns how many sessions fit.
func raiseNoFileFor(t *testing.T, n int) int {
	t.Helper()
	var old syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &old); err != nil {
		t.Fatal(err)
	}
	want := uint64(4*n + 1000)
	lim := old
	if lim.Cur < want {
		lim.Cur = want
		if lim.Max < want {
			lim.Max = want // root may raise the hard limit
		}
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			lim = old
			lim.Cur = old.Max
			_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
			n = int((lim.Cur - 1000) / 4)
			t.Logf("RLIMIT_NOFILE hard limit %d: measuring %d sessions", old.Max, n)
		}
		t.Cleanup(func() { _ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &old) })
	}
	return n
}
