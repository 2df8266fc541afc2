package testenv

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// WaitBackendsGone waits up to 10 s until the server has no backend whose
// application_name is app, or starts with app followed by pgward's part
// (upstreams.<name>.application_name: "app pgward:…").
func (p *Postgres) WaitBackendsGone(t testing.TB, app string) {
	t.Helper()
	ctx := context.Background()
	admin, err := p.Admin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(ctx)
	deadline := time.Now().Add(10 * time.Second)
	for {
		var n int
		if err := admin.QueryRow(ctx, "select count(*) from pg_stat_activity where application_name = $1 or starts_with(application_name, $1 || ' pgward:')", app).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d upstream sessions %q left", n, app)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// CancelWhenRunning sends c's CancelRequest (to wherever c connected: pgward,
// for a session through it) once the server shows backend pid running
// query (pg_stat_activity: active, in pg_sleep), and returns its error.
// A cancel sent after a fixed sleep instead can arrive while the query is
// still on its way (a loaded machine): the server ignores a cancel for an
// idle backend, and the query then runs to its end. pid is the server's
// own (BackendPID), not what pgward handed the client.
func (p *Postgres) CancelWhenRunning(c *pgx.Conn, pid uint32, query string) error {
	ctx := context.Background()
	admin, err := p.Admin(ctx)
	if err != nil {
		return err
	}
	defer admin.Close(ctx)
	deadline := time.Now().Add(15 * time.Second)
	for {
		var n int
		if err := admin.QueryRow(ctx, "select count(*) from pg_stat_activity where pid = $1 and state = 'active' and query = $2 and wait_event = 'PgSleep'", int64(pid), query).Scan(&n); err != nil {
			return err
		}
		if n == 1 {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("backend %d never showed %q running", pid, query)
		}
		time.Sleep(20 * time.Millisecond)
	}
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	return c.PgConn().CancelRequest(cctx)
}
