package broker

import (
	"strings"
	"testing"
	"time"
)

func TestLimiterRateAndBurst(t *testing.T) {
	now := time.Unix(1000, 0)
	l := newLimiter(LimitsConfig{AuthRate: 2, AuthBurst: 3})
	l.now = func() time.Time { return now }
	for i := range 3 {
		if err := l.admit(uidKey(7)); err != nil {
			t.Fatalf("request %d within the burst refused: %v", i, err)
		}
	}
	err := l.admit(uidKey(7))
	if err == nil || err.Code != CodeTooManyConnections || err.Reason != ReasonThrottled ||
		!strings.Contains(err.Message, "uid 7") || !strings.Contains(err.Message, "limits.auth_rate") {
		t.Fatalf("over the burst: %v", err)
	}
	// Another caller is untouched.
	if err := l.admit(principalKey("billing")); err != nil {
		t.Fatalf("other principal: %v", err)
	}
	now = now.Add(500 * time.Millisecond) // one token back at 2/s
	if err := l.admit(uidKey(7)); err != nil {
		t.Fatalf("after refill: %v", err)
	}
	if err := l.admit(uidKey(7)); err == nil {
		t.Fatal("second request after one token's refill accepted")
	}
	// Off by default.
	l0 := newLimiter(LimitsConfig{})
	for range 1000 {
		if err := l0.admit(uidKey(1)); err != nil {
			t.Fatal(err)
		}
	}
}

func TestLimiterSessions(t *testing.T) {
	l := newLimiter(LimitsConfig{SessionsPerPrincipal: 2})
	r1, err := l.acquire("p")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := l.acquire("p"); err != nil {
		t.Fatal(err)
	}
	if _, err := l.acquire("p"); err == nil || !strings.Contains(err.Message, "sessions_per_principal") {
		t.Fatalf("third session: %v", err)
	}
	r1()
	r1() // idempotent
	if _, err := l.acquire("p"); err != nil {
		t.Fatalf("after release: %v", err)
	}
	if _, err := l.acquire("p"); err == nil {
		t.Fatal("double release freed two slots")
	}
}

// A flood of distinct uids cannot grow the limiter without bound, and a
// sweep never drops a bucket that holds sessions.
func TestLimiterMemoryBounded(t *testing.T) {
	now := time.Unix(1000, 0)
	l := newLimiter(LimitsConfig{AuthRate: 1, AuthBurst: 1, SessionsPerPrincipal: 5})
	l.now = func() time.Time { return now }
	release, err := l.acquire("held")
	if err != nil {
		t.Fatal(err)
	}
	for uid := range uint32(200000) {
		_ = l.admit(uidKey(uid)) // each drains its bucket: not idle
		if uid%1000 == 0 {
			now = now.Add(time.Millisecond)
		}
	}
	if n := l.size(); n > maxBuckets {
		t.Fatalf("%d buckets after 200000 callers; bound is %d", n, maxBuckets)
	}
	l.mu.Lock()
	b := l.buckets[principalKey("held")]
	l.mu.Unlock()
	if b == nil || b.sessions != 1 {
		t.Fatal("the bucket holding a session was evicted")
	}
	release()
	// Once refilled, everything idle goes at the next sweep.
	now = now.Add(time.Hour)
	for uid := range uint32(sweepAbove + 1) {
		_ = l.admit(uidKey(1<<30 + uid))
	}
	if n := l.size(); n > sweepAbove+2 {
		t.Fatalf("%d buckets after idle sweep", n)
	}
}

func TestLimiterWrongCancelKeys(t *testing.T) {
	now := time.Unix(1000, 0)
	l := newLimiter(LimitsConfig{})
	l.now = func() time.Time { return now }
	for range cancelBurst {
		if !l.cancelAllowed(5) {
			t.Fatal("throttled within the burst")
		}
		l.wrongCancel(5)
	}
	if l.cancelAllowed(5) {
		t.Fatal("not throttled after the burst")
	}
	if !l.cancelAllowed(6) {
		t.Fatal("another uid throttled")
	}
	now = now.Add(time.Second / cancelRate)
	if !l.cancelAllowed(5) {
		t.Fatal("not refilled")
	}
}

// limits.max_message_bytes and limits.buffer_memory: defaults, the
// deprecated listen.max_message_size, and the rule that one message must
// fit in the budget.
func TestConfigMessageLimits(t *testing.T) {
	base := func() Config {
		return Config{
			Upstreams:  map[string]UpstreamConfig{"orders": {Address: "/run/pg/.s.PGSQL.5432"}},
			Principals: map[string]Principal{"b": {Match: Selectors{UID: []uint32{1}}}},
			Grants:     []Grant{{Principal: "b", Upstream: "orders", Roles: []string{"r"}}},
		}
	}
	for _, c := range []struct {
		name       string
		listen     int
		max        int
		budget     int64
		wantMax    int
		wantErr    string
		deprecated bool
	}{
		{name: "defaults", wantMax: DefaultMaxMessageBytes},
		{name: "set", max: 1 << 20, budget: 8 << 20, wantMax: 1 << 20},
		{name: "alias", listen: 1 << 20, wantMax: 1 << 20, deprecated: true},
		{name: "alias and key agree", listen: 1 << 20, max: 1 << 20, wantMax: 1 << 20, deprecated: true},
		{name: "alias and key disagree", listen: 2 << 20, max: 1 << 20, wantErr: "listen.max_message_size", deprecated: true},
		{name: "over the budget", max: 64 << 20, budget: 32 << 20, wantErr: "limits.buffer_memory"},
		{name: "default over a small budget", budget: 1 << 20, wantErr: "limits.buffer_memory"},
		{name: "alias over the default budget", listen: 512 << 20, wantErr: "limits.buffer_memory", deprecated: true},
		{name: "over the protocol", max: 1<<31 + 1, budget: 4 << 30, wantErr: "limits.max_message_bytes"},
		{name: "tiny", max: 100, wantErr: "limits.max_message_bytes"},
		{name: "negative budget", budget: -1, wantErr: "limits.buffer_memory"},
	} {
		cfg := base()
		cfg.Listen.MaxMessageSize, cfg.Limits.MaxMessageBytes, cfg.Limits.BufferMemory = c.listen, c.max, c.budget
		err := cfg.Validate()
		switch {
		case c.wantErr == "" && err != nil:
			t.Errorf("%s: %v", c.name, err)
		case c.wantErr != "" && (err == nil || !containsLine(err.Error(), c.wantErr+":")):
			t.Errorf("%s: %v; want a problem with %s", c.name, err, c.wantErr)
		case c.wantErr == "" && cfg.maxMessageBytes() != c.wantMax:
			t.Errorf("%s: max message bytes %d, want %d", c.name, cfg.maxMessageBytes(), c.wantMax)
		}
		if got := len(cfg.Deprecations()) > 0; got != c.deprecated {
			t.Errorf("%s: deprecations %v", c.name, cfg.Deprecations())
		}
	}
}
