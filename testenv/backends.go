package testenv

import (
	"context"
	"testing"
	"time"
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
