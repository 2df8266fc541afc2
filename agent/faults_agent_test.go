package agent

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pgward/pgward/broker"
	"github.com/pgward/pgward/testenv"
)

// What stays of the fault tests in agent: secrets backends as the agent's
// configuration routes them, and the helpers its other end-to-end tests
// share. The broker's fault tests are in broker/faults_test.go.

// privatePG starts a Postgres of the test's own, for faults that would
// disturb the shared one. (It used to call testenv.Require, which starts
// a server, and then start a second one.)
func privatePG(t *testing.T, opts testenv.Options) *testenv.Postgres {
	t.Helper()
	return testenv.Require(t, opts)
}

// onPrivatePG points upstream "orders" at pg.
func onPrivatePG(pg *testenv.Postgres) func(*harness, *Config) {
	return func(h *harness, c *Config) {
		u := c.Upstreams["orders"]
		u.Address = pg.SocketPath()
		c.Upstreams["orders"] = u
	}
}

// A file backend whose file disappears or becomes unreadable keeps serving
// the last good content (and says so at WARN); an env backend without the
// variable refuses at once (28000); neither disturbs the other's upstream.
func TestSecretsBackendOutagesIsolated(t *testing.T) {
	t.Setenv("PGWARD_SECRET_ORDERS_TLS_"+strings.ToUpper(testenv.ScramUser), "")
	os.Unsetenv("PGWARD_SECRET_ORDERS_TLS_" + strings.ToUpper(testenv.ScramUser))
	h := newHarness(t, func(h *harness, c *Config) {
		u := c.Upstreams["orders_tls"]
		u.Secrets = "env"
		c.Upstreams["orders_tls"] = u
	})
	ctx := context.Background()
	start := time.Now()
	e := connectErr(t, h.dsn(testenv.ScramUser, "orders_tls"))
	if e.Code != broker.CodeInvalidAuthorization || time.Since(start) > 2*time.Second {
		t.Fatalf("env backend without the variable: %s %q after %v", e.Code, e.Message, time.Since(start))
	}
	c := h.connect(t, testenv.ScramUser, "orders")
	c.Close(ctx)
	// The secrets file goes away: the file backend keeps its last good content.
	path := filepath.Join(h.dir, "secrets.yaml")
	if err := os.Rename(path, path+".gone"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(1100 * time.Millisecond) // past the backend's once-a-second check
	c = h.connect(t, testenv.ScramUser, "orders")
	c.Close(ctx)
	if !strings.Contains(h.logs.String(), "secrets file unreadable; keeping the last good content") {
		t.Fatal("no WARN for the missing secrets file")
	}
}
