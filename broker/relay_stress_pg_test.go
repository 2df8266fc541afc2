package broker

import (
	"bytes"
	"context"
	"fmt"
	"runtime"
	"runtime/pprof"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgward/pgward/testenv"
)

// TestRelayStressRealPostgres churns many short sessions of short
// statements (simple, pipelined batches, extended with parameters) through
// a Server against the real server, at GOMAXPROCS 1 and 2. Every
// statement has 10 s to answer; a statement that does not is a relay hang,
// reported with pgward's goroutines. It is bounded to a few seconds.
func TestRelayStressRealPostgres(t *testing.T) {
	h := newHarness(t, nil)
	d := 3 * time.Second
	if testing.Short() {
		d = time.Second
	}
	for _, procs := range []int{1, 2} {
		t.Run("GOMAXPROCS="+strconv.Itoa(procs), func(t *testing.T) {
			defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(procs))
			stopAt := time.Now().Add(d)
			var wg sync.WaitGroup
			var dumped sync.Once
			errc := make(chan error, 16)
			var sessions, statements sync.Map
			for w := range 12 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for s := 0; time.Now().Before(stopAt); s++ {
						n, err := stressOneSession(h, w, s)
						sessions.Store([2]int{w, s}, true)
						statements.Store([2]int{w, s}, n)
						if err != nil {
							dumped.Do(func() {
								var b bytes.Buffer
								_ = pprof.Lookup("goroutine").WriteTo(&b, 1)
								t.Logf("goroutines:\n%s", b.String())
							})
							errc <- fmt.Errorf("worker %d session %d: %w", w, s, err)
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
			ns, nq := 0, 0
			statements.Range(func(_, v any) bool { ns++; nq += v.(int); return true })
			t.Logf("%d sessions, %d statements", ns, nq)
		})
	}
}

func stressOneSession(h *harness, w, s int) (int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, h.dsn(testenv.ScramUser, "orders", "application_name=stress"))
	if err != nil {
		return 0, fmt.Errorf("connect: %w", err)
	}
	defer c.Close(context.Background())
	n := 0
	for i := range 1 + (w+s)%8 {
		qctx, qcancel := context.WithTimeout(context.Background(), 10*time.Second)
		switch i % 3 {
		case 0:
			_, err = c.Exec(qctx, "select 1")
			n++
		case 1:
			var v int
			err = c.QueryRow(qctx, "select $1::int + 1", i).Scan(&v)
			if err == nil && v != i+1 {
				err = fmt.Errorf("got %d, want %d", v, i+1)
			}
			n++
		case 2:
			b := &pgx.Batch{}
			for j := range 4 {
				b.Queue("select $1::int", j)
			}
			err = c.SendBatch(qctx, b).Close()
			n += 4
		}
		qcancel()
		if err != nil {
			return n, fmt.Errorf("statement %d: %w", i, err)
		}
	}
	return n, nil
}
