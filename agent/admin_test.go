package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
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

// Requests that ask for nothing valid get 400 and are audited as failed
// admin actions; the default socket's directory is pgward's own (0700)
// and goes with it.
func TestAdminBadRequests(t *testing.T) {
	testenv.RequireRoot(t)
	h := newHarness(t, nil)
	path := h.agent.config().AdminSocket()
	if want := h.dir + "-admin/admin.sock"; path != want {
		t.Fatalf("default admin socket %s, want %s", path, want)
	}
	if fi, err := os.Stat(filepath.Dir(path)); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("admin directory: %v %v", fi, err)
	}
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", path)
	}}}
	defer hc.CloseIdleConnections()
	for _, tc := range []struct{ method, url, body, event, error string }{
		{"GET", "/v1/sessions?uid=x", "", "admin.sessions.list", `uid \"x\" is not a number`},
		{"POST", "/v1/sessions/end", "{", "admin.sessions.end", "not an end request"},
		{"POST", "/v1/sessions/end", `{"sids":[],"reason":"x"}`, "admin.sessions.end", "no session id given"},
		{"POST", "/v1/sessions/end", `{"sids":["a"],"why":"x"}`, "admin.sessions.end", "unknown field"},
		{"POST", "/v1/sessions/end", `{"sids":["a"],"reason":"` + strings.Repeat("x", 201) + `"}`, "admin.sessions.end", "at most 200 bytes"},
	} {
		req, _ := http.NewRequest(tc.method, "http://pgward"+tc.url, strings.NewReader(tc.body))
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(body), tc.error) {
			t.Errorf("%s %s %q: %d %s", tc.method, tc.url, tc.body, resp.StatusCode, body)
		}
		found := false
		for _, ev := range h.auditEvents(t) {
			if ev["event"] == tc.event && ev["success"] == false && strings.Contains(fmt.Sprint(ev["error"]), strings.ReplaceAll(tc.error, `\"`, `"`)) {
				found = true
			}
		}
		if !found {
			t.Errorf("%s %s %q: not audited", tc.method, tc.url, tc.body)
		}
	}
	h.stop()
	if _, err := os.Stat(filepath.Dir(path)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("admin directory left behind: %v", err)
	}
}
