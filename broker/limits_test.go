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
