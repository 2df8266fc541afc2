package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgward/pgward/testenv"
)

// The attack and its bounds (issue 13, point 1).
const (
	hostileAnnounce  = 100      // hostile sessions: a Query header announcing a large message
	hostileFill      = 40       // of which announce max_message_bytes and send it as fast as pgward reads; the rest 1 GiB
	hostileStreams   = 20       // sessions reading large results slowly
	hostileMaxMsg    = 16 << 20 // limits.max_message_bytes in the test
	hostileBudget    = 64 << 20 // limits.buffer_memory in the test
	hostileStreamLen = 32 << 20 // bytes of result per streaming session
	hostileRSSMiB    = 256      // pgward's VmRSS must stay under this, sampled throughout
	// A granted client, already running, logs in afresh and runs a query
	// in under this, each time, throughout the attack (see loginBound).
	hostileLoginMax = time.Second
)

// TestHostileMemoryBounded runs pgward as its own process (`pgward agent`,
// this test binary re-executed) in front of a real PostgreSQL, with
// limits.max_message_bytes 16 MiB and limits.buffer_memory 64 MiB, and
// attacks its memory from one granted uid:
//
//   - 60 sessions send a Query header announcing 1 GiB, then trickle bytes:
//     each must get 54000 naming limits.max_message_bytes and be closed,
//     before pgward reads more than the header;
//   - 40 sessions send a Query header announcing exactly max_message_bytes
//     (the largest pgward must accept) and push its body as fast as pgward
//     reads, never sending the last byte: pgward buffers them only up to
//     limits.buffer_memory, then stops reading (backpressure);
//   - 20 sessions run queries whose results are 32 MiB each (10 of one
//     32 MiB DataRow, larger than max_message_bytes and the whole budget,
//     10 of 32 rows of 1 MiB) and read them slowly.
//
// Meanwhile pgward's VmRSS, sampled every 20 ms, must stay under 256 MiB,
// and a granted client — a process of its own, started before the attack,
// as an application is — must log in afresh and run a query every 200 ms
// throughout, the first at the attack's start; a second client does the
// same straight to PostgreSQL at the same moment, and pgward may add under
// 1 s to that direct login's time (see loginBound). Every streamed result must be complete;
// their throughput is logged. Afterwards pgward_buffer_bytes is 0 and the RSS returns near its
// baseline without any help (no debug.FreeOSMemory from the test).
//
// On the code before issue 13 each of the 40 full-size Queries made pgward
// allocate its announced size at the header, so their bodies alone took it
// past 640 MiB.
func TestHostileMemoryBounded(t *testing.T) {
	if raceEnabled {
		t.Skip("-race: RSS is meaningless under the race detector's shadow memory; make test runs this without -race")
	}
	start := time.Now()
	pg := testenv.Require(t)
	dir, err := os.MkdirTemp("", "pgwh-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	port := freePort(t)
	cfgPath := writeHostileConfig(t, dir, pg, port)
	agent, agentErr := startTestChild(t, "agent", []string{
		"PGWARD_CMD_CHILD=agent --config " + cfgPath,
		"PGWARD_LOG_LEVEL=error", "PGWARD_LOG_FORMAT=text",
	})
	waitDial(t, filepath.Join(dir, ".s.PGSQL.5432"), agent)
	metricsURL := fmt.Sprintf("http://127.0.0.1:%d/metrics", port)
	waitHTTP(t, fmt.Sprintf("http://127.0.0.1:%d/readyz", port), agent, agentErr)
	pid := agent.Process.Pid

	cfg, err := pgconn.ParseConfig(fmt.Sprintf("host=%s port=5432 user=%s dbname=real sslmode=disable connect_timeout=30", dir, testenv.ScramUser))
	if err != nil {
		t.Fatal(err)
	}
	// One session first, so the baseline includes a warm login path.
	freshLogin(t, cfg, "real Postgres", "select 1")
	baseRSS := procStatusKiB(t, pid, "VmRSS")
	t.Logf("pgward baseline VmRSS %d KiB", baseRSS)

	// The granted clients that log in during the attack, through pgward
	// and straight to PostgreSQL: processes of their own, started now.
	viaClient := startLoginClient(t, fmt.Sprintf("host=%s port=5432 user=%s dbname=real sslmode=disable connect_timeout=30", dir, testenv.ScramUser))
	directClient := startLoginClient(t, fmt.Sprintf("host=%s port=%s user=%s password=%s dbname=%s sslmode=disable connect_timeout=30",
		filepath.Dir(pg.SocketPath()), strings.TrimPrefix(filepath.Base(pg.SocketPath()), ".s.PGSQL."), testenv.ScramUser, testenv.ScramPassword, testenv.Database))
	via, straight := sameMoment(t, viaClient, directClient)
	t.Logf("before the attack, a granted login with a query: %v through pgward, %v straight to PostgreSQL", via.Round(time.Millisecond), straight.Round(time.Millisecond))

	// RSS sampler.
	var peakRSS atomic.Int64
	stopSampling := make(chan struct{})
	var sampling sync.WaitGroup
	sampling.Go(func() {
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			if v, err := readVmRSS(pid); err == nil && v > peakRSS.Load() {
				peakRSS.Store(v)
			}
			select {
			case <-stopSampling:
				return
			case <-tick.C:
			}
		}
	})

	// Open every hostile and streaming session (logged in through pgward,
	// then the raw connection taken over).
	conns := openSessions(t, cfg, hostileAnnounce+hostileStreams)
	raw := make([]net.Conn, len(conns))
	for i, c := range conns {
		h, err := c.Hijack()
		if err != nil {
			t.Fatal(err)
		}
		raw[i] = h.Conn
	}
	t.Cleanup(func() {
		for _, c := range raw {
			c.Close()
		}
	})
	// The stages of the logins during the attack are the differences of
	// pgward_request_duration_seconds_sum between scrapes.
	before, err := scrapeMetrics(metricsURL, stageMetrics...)
	if err != nil {
		t.Fatal(err)
	}
	attack := time.Now()
	errs := make(chan error, len(raw))
	var wg sync.WaitGroup
	stopAttack := make(chan struct{})
	var refused atomic.Int64
	// 1 GiB announcements: refused with 54000 right away.
	for _, c := range raw[:hostileAnnounce-hostileFill] {
		wg.Go(func() {
			if err := announceAndTrickle(c, stopAttack); err != nil {
				errs <- err
				return
			}
			refused.Add(1)
		})
	}
	// Full-size Queries pushed as fast as pgward will read them.
	var pushed atomic.Int64
	for _, c := range raw[hostileAnnounce-hostileFill : hostileAnnounce] {
		wg.Go(func() { pushFullMessage(c, &pushed, stopAttack) })
	}
	// Slow readers of large results.
	var streamed atomic.Int64
	var streams sync.WaitGroup
	for i, c := range raw[hostileAnnounce:] {
		sql := fmt.Sprintf("select repeat('x', %d)", hostileStreamLen)
		want := 1
		if i%2 == 1 {
			sql = fmt.Sprintf("select repeat('x', %d) from generate_series(1, %d)", 1<<20, hostileStreamLen>>20)
			want = hostileStreamLen >> 20
		}
		streams.Go(func() {
			n, err := slowQuery(c, sql, want)
			if err != nil {
				errs <- fmt.Errorf("streaming %q: %w", sql, err)
				return
			}
			streamed.Add(n)
		})
	}

	// A granted client logs in and queries, every 200 ms, while the
	// streams run (and for at least 3 s); another does the same straight
	// to PostgreSQL at the same moment: what the machine allows.
	var logins, direct, at []time.Duration
	var lastStream atomic.Int64 // ns after attack when the last stream ended
	streamsDone := make(chan struct{})
	go func() { streams.Wait(); lastStream.Store(int64(time.Since(attack))); close(streamsDone) }()
	minEnd := time.Now().Add(3 * time.Second)
	var bufPeak, waits float64
	for done := false; !done || time.Now().Before(minEnd); {
		select {
		case <-streamsDone:
			done = true
		case <-time.After(200 * time.Millisecond):
		}
		at = append(at, time.Since(attack))
		via, straight := sameMoment(t, viaClient, directClient)
		logins, direct = append(logins, via), append(direct, straight)
		// The stages' sums since the last scrape are this login's: the
		// scrape comes after it, so the first login is at the start of
		// the attack, its most hostile moment.
		after, err := scrapeMetrics(metricsURL, append(stageMetrics, "pgward_buffer_bytes")...)
		if err == nil {
			bufPeak = max(bufPeak, after[len(stageMetrics)])
		}
		if via > hostileLoginMax/2 && before != nil && err == nil {
			var parts []string
			for i, st := range stageNames {
				parts = append(parts, fmt.Sprintf("%s %.3fs", st, after[i]-before[i]))
			}
			t.Logf("a slow granted login: %v through pgward (%v straight to PostgreSQL at the same moment); pgward's stages of it: %s",
				via.Round(time.Millisecond), straight.Round(time.Millisecond), strings.Join(parts, ", "))
		}
		if err == nil {
			before = after
		} else {
			before = nil
		}
		if time.Since(attack) > 3*time.Minute {
			t.Fatal("the streaming sessions did not finish in 3 minutes")
		}
	}
	waits, _ = scrapeMetric(metricsURL, "pgward_buffer_waits_total")
	attackTime := time.Since(attack)
	close(stopAttack)
	for _, c := range raw {
		c.Close()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}

	var worst, worstDirect time.Duration
	var all []string
	var over, farOver []string
	for i, d := range logins {
		worst, worstDirect = max(worst, d), max(worstDirect, direct[i])
		if d > loginBound(direct[i]) {
			over = append(over, fmt.Sprintf("@%v %v (%v straight to PostgreSQL)", at[i].Round(100*time.Millisecond), d.Round(time.Millisecond), direct[i].Round(time.Millisecond)))
		}
		if d > loginHardBound(direct[i]) {
			farOver = append(farOver, fmt.Sprintf("@%v %v (%v straight to PostgreSQL)", at[i].Round(100*time.Millisecond), d.Round(time.Millisecond), direct[i].Round(time.Millisecond)))
		}
		all = append(all, fmt.Sprintf("@%v %v (%v)", at[i].Round(100*time.Millisecond), d.Round(time.Millisecond), direct[i].Round(time.Millisecond)))
	}
	streamTime := time.Duration(lastStream.Load())
	t.Logf("attack ran %v: %d sessions refused (54000), %d MiB pushed into full-size Queries, %d MiB of results streamed to slow readers in %v (%.0f MiB/s)",
		attackTime.Round(time.Millisecond), refused.Load(), pushed.Load()>>20, streamed.Load()>>20, streamTime.Round(time.Millisecond),
		float64(streamed.Load())/(1<<20)/streamTime.Seconds())
	t.Logf("pgward VmRSS: baseline %d KiB, peak %d KiB (bound %d MiB); pgward_buffer_bytes peak %.0f (budget %d); pgward_buffer_waits_total %.0f",
		baseRSS, peakRSS.Load(), hostileRSSMiB, bufPeak, hostileBudget, waits)
	t.Logf("granted logins (with a query) during the attack: %d; slowest %v (bound: the direct login at the same moment + %v, or twice it when it took longer); straight to PostgreSQL at the same moments, slowest %v; ratio of the slowest %.2f; each, at its time into the attack, through pgward (direct): %s",
		len(logins), worst.Round(time.Millisecond), hostileLoginMax, worstDirect.Round(time.Millisecond),
		worst.Seconds()/worstDirect.Seconds(), strings.Join(all, " "))
	// One login over the bound is the machine (a GC pause, both cores
	// taken by the attack's streams in system calls: a runtime trace of
	// such a run showed the login goroutine runnable without a P for
	// 561 ms at a stretch); two, or one far over it, is pgward.
	if len(over) > 1 || len(farOver) > 0 {
		t.Errorf("%d of %d granted logins with a query took %v or more longer than the same login straight to PostgreSQL at the same moment (or over twice it, when that took longer than %v) during the attack, %d of them over %v longer (one login over the first bound is allowed, none over the second): %s",
			len(over), len(logins), hostileLoginMax, hostileLoginMax, len(farOver), hostileLoginMax*3/2, strings.Join(over, ", "))
	} else if len(over) == 1 {
		t.Logf("one granted login over the bound (allowed once): %s", over[0])
	}
	if peakRSS.Load() > hostileRSSMiB<<10 {
		t.Errorf("pgward's VmRSS reached %d KiB, over the %d MiB bound", peakRSS.Load(), hostileRSSMiB)
	}
	if bufPeak > hostileBudget {
		t.Errorf("pgward_buffer_bytes reached %.0f, over limits.buffer_memory %d", bufPeak, hostileBudget)
	}
	if waits == 0 {
		t.Errorf("pgward_buffer_waits_total is 0: the budget never pushed back")
	}
	if got := streamed.Load(); got != hostileStreams*hostileStreamLen {
		t.Errorf("streamed %d bytes of results, want %d", got, hostileStreams*hostileStreamLen)
	}

	// Memory is given back: the buffers at once, the RSS by the runtime
	// on its own (no debug.FreeOSMemory from the test).
	ended := time.Now()
	deadline := ended.Add(3 * time.Minute)
	for {
		b, berr := scrapeMetric(metricsURL, "pgward_buffer_bytes")
		rss := procStatusKiB(t, pid, "VmRSS")
		if berr == nil && b == 0 && rss <= baseRSS+32<<10 {
			t.Logf("after the attack: pgward_buffer_bytes 0 and VmRSS %d KiB (baseline %d KiB) in %v", rss, baseRSS, time.Since(ended).Round(100*time.Millisecond))
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("3 minutes after the attack: pgward_buffer_bytes %v (%v), VmRSS %d KiB, baseline %d KiB", b, berr, rss, baseRSS)
		}
		time.Sleep(500 * time.Millisecond)
	}
	freshLogin(t, cfg, "real Postgres", "select 1")
	close(stopSampling)
	sampling.Wait()
	stopTestChild(t, agent, agentErr)
	t.Logf("wall time %v", time.Since(start).Round(time.Millisecond))
}

// announceAndTrickle sends a Query header announcing 1 GiB and then one
// byte every 50 ms; pgward must answer 54000 naming the limit and close.
func announceAndTrickle(c net.Conn, stop <-chan struct{}) error {
	hdr := binary.BigEndian.AppendUint32([]byte{'Q'}, 1<<30)
	if _, err := c.Write(hdr); err != nil {
		return fmt.Errorf("announce: %w", err)
	}
	go func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
			if _, err := c.Write([]byte{'x'}); err != nil {
				return
			}
		}
	}()
	_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
	r := bufio.NewReader(c)
	typ, body, err := readMessage(r)
	if err != nil {
		return fmt.Errorf("after announcing 1 GiB: %w", err)
	}
	code, msg := errFields(body)
	if typ != 'E' || code != "54000" || !strings.Contains(msg, "limits.max_message_bytes") || !strings.Contains(msg, "1073741825") {
		return fmt.Errorf("after announcing 1 GiB: %q %s %q; want 54000 naming limits.max_message_bytes and the size", typ, code, msg)
	}
	// Closed: EOF, or a reset because this client kept writing (pgward
	// drops what a refused client sends for 2 s, then closes).
	if _, _, err := readMessage(r); !errors.Is(err, io.EOF) && !errors.Is(err, syscall.ECONNRESET) {
		return fmt.Errorf("after 54000: %v; want the connection closed", err)
	}
	return nil
}

// pushFullMessage sends a Query of exactly max_message_bytes, all of it but
// the last byte, as fast as pgward reads, then holds until stop.
func pushFullMessage(c net.Conn, pushed *atomic.Int64, stop <-chan struct{}) {
	hdr := binary.BigEndian.AppendUint32([]byte{'Q'}, hostileMaxMsg-1)
	if _, err := c.Write(hdr); err != nil {
		return
	}
	chunk := make([]byte, 64<<10)
	for i := range chunk {
		chunk[i] = 'x'
	}
	left := hostileMaxMsg - 5 - 1
	for left > 0 {
		n, err := c.Write(chunk[:min(left, len(chunk))])
		pushed.Add(int64(n))
		left -= n
		if err != nil {
			return
		}
	}
	<-stop
}

// slowQuery runs sql on a raw connection and reads the answer slowly
// (at most 256 KiB per read, 10 ms apart: 25 MiB/s), returning the bytes
// of DataRow values.
func slowQuery(c net.Conn, sql string, wantRows int) (int64, error) {
	q := append(binary.BigEndian.AppendUint32([]byte{'Q'}, uint32(4+len(sql)+1)), sql...)
	if _, err := c.Write(append(q, 0)); err != nil {
		return 0, err
	}
	_ = c.SetReadDeadline(time.Now().Add(150 * time.Second))
	r := bufio.NewReaderSize(&slowReader{c}, 256<<10)
	var total int64
	rows := 0
	for {
		var hdr [5]byte
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			return total, err
		}
		n := int64(binary.BigEndian.Uint32(hdr[1:])) - 4
		switch hdr[0] {
		case 'D':
			// int16 column count, int32 value length, the value.
			var pre [6]byte
			if _, err := io.ReadFull(r, pre[:]); err != nil {
				return total, err
			}
			m, err := io.CopyN(io.Discard, r, n-6)
			total += m
			rows++
			if err != nil {
				return total, err
			}
		case 'E':
			body := make([]byte, n)
			_, _ = io.ReadFull(r, body)
			code, msg := errFields(body)
			return total, fmt.Errorf("server error %s: %s", code, msg)
		case 'Z':
			if _, err := r.Discard(int(n)); err != nil {
				return total, err
			}
			if rows != wantRows {
				return total, fmt.Errorf("%d rows, want %d", rows, wantRows)
			}
			return total, nil
		default:
			if _, err := r.Discard(int(n)); err != nil {
				return total, err
			}
		}
	}
}

// slowReader reads at most 256 KiB at a time, 10 ms apart: a slow client.
type slowReader struct{ c net.Conn }

func (s *slowReader) Read(p []byte) (int, error) {
	time.Sleep(10 * time.Millisecond)
	return s.c.Read(p[:min(len(p), 256<<10)])
}

// loginBound is what a granted login with a query through pgward may take
// during the attack, given the same done straight to PostgreSQL at the same
// moment: pgward may add under hostileLoginMax to it (or, when the direct
// login alone took longer than that, at most double it). The bound is
// relative because the attack saturates the machine's cores (the attackers
// are this test's process and PostgreSQL's backends, on the same cores as
// pgward): straight-to-PostgreSQL logins alone took up to 1.18 s at the
// attack's peak on a quiet 2-core machine, and a clean-clone CI run failed
// an absolute 1 s bound at 1.012 s through pgward with 0.886 s of it in
// upstream_auth, PostgreSQL's own login. What is tested is pgward's part:
// the code before issue 13 (and before growSlots) added 2–4 s.
func loginBound(direct time.Duration) time.Duration {
	return direct + max(hostileLoginMax, direct)
}

// loginHardBound is what no granted login may take during the attack:
// direct + 1.5 s, or triple the direct login. One login between the two
// bounds is allowed (see the check). Before the growth semaphore the first
// login of the attack took 2.1–5.4 s against 0.22–0.64 s direct.
func loginHardBound(direct time.Duration) time.Duration {
	return direct + max(hostileLoginMax*3/2, 2*direct)
}

// envLoginClient makes this test binary a login client (TestMain): for
// each line on stdin it logs in afresh to the connection string the
// variable holds, runs a query, closes, and prints how long the login and
// the whole took, in nanoseconds ("error: …" on failure).
const envLoginClient = "PGWARD_CMD_LOGIN_CLIENT"

const loginClientQuery = "select count(*) from pg_stat_activity"

func serveLoginClient(dsn string) int {
	cfg, err := pgconn.ParseConfig(dsn)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		began := time.Now()
		c, err := pgconn.ConnectConfig(ctx, cfg)
		if err == nil {
			login := time.Since(began)
			_, err = c.Exec(ctx, loginClientQuery).ReadAll()
			took := time.Since(began)
			c.Close(ctx)
			if err == nil {
				fmt.Printf("%d %d\n", login, took)
			}
		}
		cancel()
		if err != nil {
			fmt.Printf("error: %s\n", strings.ReplaceAll(err.Error(), "\n", " "))
		}
	}
	return 0
}

// A loginClient is a running login client (serveLoginClient): an
// application's process, already started, that opens a new connection.
// Its times are taken inside it, so neither starting a process nor this
// busy test process's scheduling is counted.
type loginClient struct {
	in  io.Writer
	out *bufio.Reader
}

func startLoginClient(t *testing.T, dsn string) *loginClient {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(self)
	cmd.Env = append(os.Environ(), envLoginClient+"="+dsn)
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { in.Close(); _ = cmd.Wait() })
	return &loginClient{in: in, out: bufio.NewReader(out)}
}

// sameMoment has both clients log in and run the query at once and returns
// how long each took (login and query).
func sameMoment(t *testing.T, a, b *loginClient) (time.Duration, time.Duration) {
	t.Helper()
	for _, c := range []*loginClient{a, b} {
		if _, err := io.WriteString(c.in, "go\n"); err != nil {
			t.Fatalf("login client: %v", err)
		}
	}
	return a.result(t), b.result(t)
}

func (c *loginClient) result(t *testing.T) time.Duration {
	t.Helper()
	line, err := c.out.ReadString('\n')
	if err != nil {
		t.Fatalf("login client: %v", err)
	}
	var login, took int64
	if _, err := fmt.Sscan(line, &login, &took); err != nil {
		t.Fatalf("granted login with a query during the attack: %s", strings.TrimSpace(line))
	}
	return time.Duration(took)
}

var stageNames = []string{"total", "identity", "credentials", "upstream_auth"}

// stageMetrics are pgward_request_duration_seconds_sum per stage.
var stageMetrics = func() []string {
	var out []string
	for _, st := range stageNames {
		out = append(out, `pgward_request_duration_seconds_sum{stage="`+st+`"}`)
	}
	return out
}()

// scrapeMetrics reads several samples (a name, with its labels if it has
// any, exactly as exposed) from one scrape.
func scrapeMetrics(url string, names ...string) ([]float64, error) {
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get(url)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	out := make([]float64, len(names))
	found := 0
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		for i, n := range names {
			if v, ok := strings.CutPrefix(sc.Text(), n+" "); ok {
				if out[i], err = strconv.ParseFloat(v, 64); err != nil {
					return nil, err
				}
				found++
			}
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("scrape %s: %w", url, err)
	}
	if found != len(names) {
		return nil, fmt.Errorf("scrape %s: %d of the samples %s", url, found, strings.Join(names, ", "))
	}
	return out, nil
}

// readVmRSS is procStatusKiB without a *testing.T, for the sampler.
func readVmRSS(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for l := range strings.Lines(string(b)) {
		if rest, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			var v int64
			_, err := fmt.Sscan(rest, &v)
			return v, err
		}
	}
	return 0, errors.New("no VmRSS")
}

// errFields returns the SQLSTATE and message of an ErrorResponse body.
func errFields(body []byte) (code, msg string) {
	for len(body) > 1 && body[0] != 0 {
		t := body[0]
		end := 1
		for end < len(body) && body[end] != 0 {
			end++
		}
		switch t {
		case 'C':
			code = string(body[1:end])
		case 'M':
			msg = string(body[1:end])
		}
		if end >= len(body) {
			break
		}
		body = body[end+1:]
	}
	return code, msg
}

func writeHostileConfig(t *testing.T, dir string, pg *testenv.Postgres, port int) string {
	t.Helper()
	return writeAgentConfig(t, dir, pg, port, "", "")
}

// writeAgentConfig writes the configuration of the hostile tests: the
// caller's uid granted testenv.ScramUser on upstream "real", limits.
// max_message_bytes 16 MiB and limits.buffer_memory 64 MiB; more, when not
// empty, adds keys to listen and to limits ("k: v, k: v").
func writeAgentConfig(t *testing.T, dir string, pg *testenv.Postgres, port int, moreListen, moreLimits string) string {
	t.Helper()
	if os.Getenv("PGWARD_TEST_EVENT_LOOP") == "1" {
		// make test's event-loop step: the hostile bounds with every
		// session on the event loop (listen.event_loop).
		moreListen = strings.TrimPrefix(moreListen+", event_loop: true", ", ")
	}
	if moreListen != "" {
		moreListen = ", " + moreListen
	}
	if moreLimits != "" {
		moreLimits = ", " + moreLimits
	}
	secretsPath := filepath.Join(dir, "secrets.yaml")
	secrets := fmt.Sprintf("real:\n  %s: { password: %q }\n", testenv.ScramUser, testenv.ScramPassword)
	if err := os.WriteFile(secretsPath, []byte(secrets), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := fmt.Sprintf(`listen: { unix_dir: %q, port: 5432%s }
upstreams:
  real: { address: %q, database: %q, connect_timeout: 30s }
secrets: { backend: file, file: { path: %q } }
principals:
  me: { match: { uid: [%d] } }
grants:
  - { principal: me, upstream: real, roles: [%s] }
limits: { max_message_bytes: %d, buffer_memory: %d%s }
audit: { path: %q, durability: write }
metrics: { listen: "127.0.0.1:%d" }
ebpf: { enabled: "false" }
`, dir, moreListen, pg.SocketPath(), testenv.Database, secretsPath, os.Getuid(), testenv.ScramUser,
		hostileMaxMsg, hostileBudget, moreLimits, filepath.Join(dir, "audit.jsonl"), port)
	path := filepath.Join(dir, "pgward.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestLargeMessagesThroughBoundedAgent: with limits.max_message_bytes at
// 16 MiB and limits.buffer_memory at 64 MiB, what pgward need not inspect
// still streams whatever its size, through a real PostgreSQL: a single
// CopyData message of 256 MiB (COPY FROM STDIN) and a single DataRow of
// 256 MiB (select repeat('x', 268435456)). What it must inspect is capped:
// a 17 MiB Query from pgx gets 54000 naming the key (the driver's write
// completes: pgward drops the rest of the message before closing), and a
// server ErrorResponse of 20 MB ends the session with 08006 naming the key.
// (1 GiB is what the protocol allows; 256 MiB keeps make test's time
// reasonable on two shared cores, and is 16× the message cap and 4× the
// budget, so nothing of it can be buffered whole.)
func TestLargeMessagesThroughBoundedAgent(t *testing.T) {
	pg := testenv.Require(t)
	dir, err := os.MkdirTemp("", "pgwl-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	port := freePort(t)
	cfgPath := writeHostileConfig(t, dir, pg, port)
	agent, agentErr := startTestChild(t, "agent", []string{
		"PGWARD_CMD_CHILD=agent --config " + cfgPath,
		"PGWARD_LOG_LEVEL=error", "PGWARD_LOG_FORMAT=text",
	})
	waitDial(t, filepath.Join(dir, ".s.PGSQL.5432"), agent)
	metricsURL := fmt.Sprintf("http://127.0.0.1:%d/metrics", port)
	waitHTTP(t, fmt.Sprintf("http://127.0.0.1:%d/readyz", port), agent, agentErr)
	cfg, err := pgconn.ParseConfig(fmt.Sprintf("host=%s port=5432 user=%s dbname=real sslmode=disable connect_timeout=30", dir, testenv.ScramUser))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	big := 256 << 20
	if raceEnabled {
		big = 64 << 20 // still 4× the message cap and the whole budget
	}

	t.Run("CopyData256MiB", func(t *testing.T) {
		c, err := pgconn.ConnectConfig(ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close(ctx)
		if _, err := c.Exec(ctx, "create temp table big_copy (x text)").ReadAll(); err != nil {
			t.Fatal(err)
		}
		h, err := c.Hijack()
		if err != nil {
			t.Fatal(err)
		}
		conn := h.Conn
		defer conn.Close()
		_ = conn.SetDeadline(time.Now().Add(3 * time.Minute))
		sql := "copy big_copy from stdin"
		q := append(binary.BigEndian.AppendUint32([]byte{'Q'}, uint32(4+len(sql)+1)), sql...)
		if _, err := conn.Write(append(q, 0)); err != nil {
			t.Fatal(err)
		}
		r := bufio.NewReader(conn)
		if typ, _, err := readMessage(r); err != nil || typ != 'G' {
			t.Fatalf("CopyInResponse: %q %v", typ, err)
		}
		// One CopyData message of 256 MiB: 256 lines of 1 MiB.
		line := make([]byte, 1<<20)
		for i := range line {
			line[i] = 'x'
		}
		line[len(line)-1] = '\n'
		if _, err := conn.Write(binary.BigEndian.AppendUint32([]byte{'d'}, uint32(4+big))); err != nil {
			t.Fatal(err)
		}
		began := time.Now()
		for range big >> 20 {
			if _, err := conn.Write(line); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := conn.Write([]byte{'c', 0, 0, 0, 4}); err != nil {
			t.Fatal(err)
		}
		typ, body, err := readMessage(r)
		if err != nil || typ != 'C' || string(body) != fmt.Sprintf("COPY %d\x00", big>>20) {
			code, msg := errFields(body)
			t.Fatalf("after CopyDone: %q %q %v (%s %s)", typ, body, err, code, msg)
		}
		t.Logf("one %d MiB CopyData message through pgward in %v", big>>20, time.Since(began).Round(time.Millisecond))
	})

	t.Run("DataRow256MiB", func(t *testing.T) {
		c, err := pgconn.ConnectConfig(ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		h, err := c.Hijack()
		if err != nil {
			t.Fatal(err)
		}
		defer h.Conn.Close()
		began := time.Now()
		n, err := slowQuery(h.Conn, fmt.Sprintf("select repeat('x', %d)", big), 1)
		if err != nil || n != int64(big) {
			t.Fatalf("%d bytes, %v; want %d", n, err, big)
		}
		t.Logf("one %d MiB DataRow through pgward to a slow reader in %v", big>>20, time.Since(began).Round(time.Millisecond))
	})

	t.Run("QueryOverLimit", func(t *testing.T) {
		c, err := pgconn.ConnectConfig(ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close(ctx)
		sql := "select '" + strings.Repeat("x", 17<<20) + "'"
		_, err = c.Exec(ctx, sql).ReadAll()
		var pgErr *pgconn.PgError
		if !errors.As(err, &pgErr) || pgErr.Code != "54000" || !strings.Contains(pgErr.Message, "limits.max_message_bytes") ||
			!strings.Contains(pgErr.Message, fmt.Sprint(len(sql)+6)) {
			t.Fatalf("a %d-byte Query: %v; want 54000 naming limits.max_message_bytes and the size", len(sql)+6, err)
		}
		if !c.IsClosed() {
			if _, err := c.Exec(ctx, "select 1").ReadAll(); err == nil {
				t.Fatal("the session still works after 54000")
			}
		}
	})

	t.Run("ServerErrorOverLimit", func(t *testing.T) {
		c, err := pgconn.ConnectConfig(ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close(ctx)
		_, err = c.Exec(ctx, "do $$ begin raise exception '%', repeat('x', 20000000); end $$").ReadAll()
		var pgErr *pgconn.PgError
		if !errors.As(err, &pgErr) || pgErr.Code != "08006" || !strings.Contains(pgErr.Message, "limits.max_message_bytes") {
			t.Fatalf("a 20 MB ErrorResponse from the server: %v; want 08006 naming limits.max_message_bytes", err)
		}
	})

	for _, m := range []struct {
		name string
		min  float64
	}{{`pgward_messages_too_large_total{from="client"}`, 1}, {`pgward_messages_too_large_total{from="server"}`, 1}, {"pgward_buffer_bytes", 0}} {
		v, err := scrapeMetric(metricsURL, m.name)
		if err != nil || v < m.min || (m.min == 0 && v != 0) {
			t.Errorf("%s = %v (%v)", m.name, v, err)
		}
	}
	stopTestChild(t, agent, agentErr)
}
