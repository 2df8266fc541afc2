package agent

import (
	"testing"
	"time"

	"github.com/pgward/pgward/broker"
)

// The reuse tests themselves are broker's (broker/reuse_e2e_test.go);
// these helpers serve the agent's end-to-end tests that run on a reuse
// upstream.

func reuseHarness(t *testing.T) *harness {
	return newHarness(t, func(h *harness, c *Config) {
		u := c.Upstreams["orders"]
		u.Reuse = &broker.ReuseConfig{MaxIdle: 2, IdleTimeout: time.Minute}
		c.Upstreams["orders"] = u
	})
}

// waitIdle waits until n upstream connections are parked (what
// `pgward sessions` lists as parked).
func waitIdle(t *testing.T, h *harness, n int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for len(h.agent.Broker().Parked()) != n {
		if time.Now().After(deadline) {
			t.Fatalf("%d upstream connections parked, want %d", len(h.agent.Broker().Parked()), n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
