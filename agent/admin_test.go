package agent

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/pgward/pgward/testenv"
)

// A connect around pgward that eBPF saw is in the admin API's list (what
// `pgward sessions` shows under "direct connects"), with the process.
func TestAdminListsDirectConnects(t *testing.T) {
	h, cg, uid := ebpfHarness(t, false, nil)
	c := NewAdminClient(h.agent.config().AdminSocket())
	ctx := context.Background()
	l, err := c.Sessions(ctx, AdminFilter{})
	if err != nil || !l.EBPF || len(l.DirectConnects) != 0 {
		t.Fatalf("before: %+v %v", l, err)
	}
	direct := fmt.Sprintf("host=127.0.0.1 port=%d user=%s dbname=%s sslmode=disable", h.pg.Port, testenv.ScramUser, testenv.Database)
	if out, err := psqlIn(t, cg, uid, direct, "PGPASSWORD="+testenv.ScramPassword); err != nil {
		t.Fatalf("direct psql: %v %s", err, out)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		l, err = c.Sessions(ctx, AdminFilter{UID: &uid})
		if err != nil {
			t.Fatal(err)
		}
		if len(l.DirectConnects) > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the direct connect is not listed")
		}
		time.Sleep(50 * time.Millisecond)
	}
	d := l.DirectConnects[0]
	if d.Process.UID != uid || d.Process.Comm != "psql" || d.Dest != h.pg.TCPAddr() || d.Upstream == "" || d.Blocked || time.Since(d.Time) > time.Minute {
		t.Errorf("direct connect listed: %+v", d)
	}
	other := uid + 1
	if l, err := c.Sessions(ctx, AdminFilter{UID: &other}); err != nil || len(l.DirectConnects) != 0 {
		t.Errorf("--uid of another uid: %+v %v", l, err)
	}
}
