package broker

import (
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pgward/pgward/testenv"
)

// TestCancelClientProcess is the process TestCancelFromAnotherUID runs as
// another uid: it sends one CancelRequest and exits.
func TestCancelClientProcess(t *testing.T) {
	spec := os.Getenv("PGWARD_CANCEL_CLIENT")
	if spec == "" {
		return // not a test: the cancel client process of TestCancelFromAnotherUID, run by it with its variable set (a skip would fail make test under CI=true)
	}
	f := strings.Fields(spec)
	pid, _ := strconv.ParseUint(f[1], 10, 32)
	key, _ := strconv.ParseUint(f[2], 10, 32)
	if err := testenv.SendCancel("unix", f[0], uint32(pid), uint32(key)); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	os.Exit(0)
}

// The right key from another uid cancels nothing; from the session's own
// uid it cancels.
func TestCancelFromAnotherUID(t *testing.T) {
	testenv.RequireRoot(t)
	h := newHarness(t, nil)
	uid := testenv.UnprivilegedIDs(t, 1)[0]
	bin, err := testenv.TestBinary()
	if err != nil {
		t.Fatal(err)
	}
	// The session must belong to a non-root uid: root may cancel anything.
	// Run it as psql? Cancel needs the key, so use a granted uid through pgx
	// in this process and send the foreign cancel as another uid.
	c := h.connect(t, testenv.ScramUser, "orders")
	// The key pgward handed the client in BackendKeyData.
	key := binary.BigEndian.Uint32(c.PgConn().SecretKey())
	res := make(chan error, 1)
	go func() {
		_, err := c.Exec(context.Background(), "select pg_sleep(1)")
		res <- err
	}()
	time.Sleep(200 * time.Millisecond)
	cmd := testenv.RunAs(uid, uid, bin, "-test.run=^TestCancelClientProcess$")
	cmd.Env = append(cmd.Env, fmt.Sprintf("PGWARD_CANCEL_CLIENT=%s %d %d", h.socketPath(), c.PgConn().PID(), key))
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("cancel client: %v %s", err, out)
	}
	if err := <-res; err != nil {
		t.Fatalf("a cancel from uid %d with the right key cancelled root's query: %v", uid, err)
	}
	h.obs.mu.Lock()
	defer h.obs.mu.Unlock()
	if len(h.obs.cancels) != 1 || h.obs.cancels[0].Forwarded || h.obs.cancels[0].Reason != "uid_mismatch" || h.obs.cancels[0].Caller.UID != uid {
		t.Fatalf("cancels reported: %+v, want one not forwarded for uid_mismatch from uid %d", h.obs.cancels, uid)
	}
}

func TestUpstreamUnreachable(t *testing.T) {
	h := newHarness(t, func(h *harness, c *Config) {
		c.Upstreams["down"] = UpstreamConfig{Address: h.dir + "/nothing-listens-here.sock"}
		c.Grants = append(c.Grants, Grant{Principal: "me", Upstream: "down", Roles: []string{testenv.ScramUser}})
		h.secrets["down"] = map[string]string{testenv.ScramUser: "x"}
	})
	e := connectErr(t, h.dsn(testenv.ScramUser, "down"))
	if e.Code != CodeCannotConnect || !strings.Contains(e.Message, `could not connect to upstream "down"`) {
		t.Fatalf("got %s %q", e.Code, e.Message)
	}
}
