package broker

import (
	"fmt"
	"strconv"
	"sync"
	"time"
)

// limiter throttles authentication requests and caps sessions per
// principal, so a flood from one caller cannot exhaust the secrets backend or
// the upstream's connection slots for everyone else.
//
// Every authentication request takes a token (limits.auth_rate,
// limits.auth_burst) from its caller's bucket: the principal whose grant
// allows the request, or — when no grant does (unknown upstream, no grant,
// failed claim, refused options) — the caller's uid. So a flood of refused
// requests from one uid is throttled without touching the principals that
// keep working. Sessions (limits.sessions_per_principal) are counted per
// principal only: refused requests hold no session.
//
// Wrong cancel keys are throttled per uid with fixed limits (cancelRate,
// cancelBurst): over them a uid's cancel requests are dropped unread, which
// makes guessing a 32-bit cancel key impractical.
//
// Memory is bounded: a bucket that holds no session and has refilled is
// idle and removed by a sweep; past maxBuckets the sweep also removes
// buckets that are merely sessionless.
type limiter struct {
	mu        sync.Mutex
	cfg       LimitsConfig
	buckets   map[limitKey]*bucket
	now       func() time.Time
	lastSweep time.Time
}

// Fixed limits for wrong cancel keys, per uid.
const (
	cancelRate  = 10  // wrong keys per second
	cancelBurst = 100 // wrong keys at once
)

// Bucket map bounds: sweep idle buckets when there are more than
// sweepAbove (at most once a second), and whatever it takes past maxBuckets.
const (
	sweepAbove = 1024
	maxBuckets = 16384
)

// limitKey names whose bucket a request draws from.
type limitKey struct {
	kind      byte // 'p' principal, 'u' uid (authentication), 'c' uid (wrong cancel keys)
	principal string
	uid       uint32
}

func principalKey(name string) limitKey { return limitKey{kind: 'p', principal: name} }
func uidKey(uid uint32) limitKey        { return limitKey{kind: 'u', uid: uid} }
func cancelKeyOf(uid uint32) limitKey   { return limitKey{kind: 'c', uid: uid} }

// String names the caller for log lines and client messages.
func (k limitKey) String() string {
	if k.kind == 'p' {
		return "principal " + strconv.Quote(k.principal)
	}
	return "uid " + strconv.FormatUint(uint64(k.uid), 10)
}

type bucket struct {
	tokens   float64
	last     time.Time
	rate     float64
	burst    float64
	sessions int
}

func newLimiter(cfg LimitsConfig) *limiter {
	return &limiter{cfg: cfg, buckets: map[limitKey]*bucket{}, now: time.Now}
}

func (l *limiter) setConfig(cfg LimitsConfig) {
	l.mu.Lock()
	l.cfg = cfg
	l.mu.Unlock()
}

func (c LimitsConfig) burst() float64 {
	if c.AuthBurst > 0 {
		return float64(c.AuthBurst)
	}
	return max(1, 2*c.AuthRate)
}

// take refills key's bucket and takes one token. Called with l.mu held.
func (l *limiter) take(key limitKey, rate, burst float64) bool {
	now := l.now()
	b := l.bucket(key, now)
	b.rate, b.burst = rate, burst
	b.tokens = min(burst, b.tokens+now.Sub(b.last).Seconds()*rate)
	b.last = now
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

// bucket returns key's bucket, creating it full. Called with l.mu held.
func (l *limiter) bucket(key limitKey, now time.Time) *bucket {
	if b := l.buckets[key]; b != nil {
		return b
	}
	if n := len(l.buckets); n >= maxBuckets || n >= sweepAbove && now.Sub(l.lastSweep) >= time.Second {
		l.sweep(now)
	}
	b := &bucket{tokens: 1 << 30, last: now}
	l.buckets[key] = b
	return b
}

// sweep removes idle buckets: no sessions and refilled (a new bucket starts
// full, so removing one changes nothing). Past maxBuckets it removes
// sessionless buckets too, which at worst hands a flooding caller a fresh
// burst, never more memory. Called with l.mu held.
func (l *limiter) sweep(now time.Time) {
	l.lastSweep = now
	for k, b := range l.buckets {
		if b.sessions == 0 && (b.rate == 0 || b.tokens+now.Sub(b.last).Seconds()*b.rate >= b.burst) {
			delete(l.buckets, k)
		}
	}
	for k, b := range l.buckets {
		if len(l.buckets) < maxBuckets*3/4 {
			break
		}
		if b.sessions == 0 {
			delete(l.buckets, k)
		}
	}
}

// admit takes one authentication token (limits.auth_rate) for key.
func (l *limiter) admit(key limitKey) *ClientError {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.cfg.AuthRate <= 0 {
		return nil
	}
	if l.take(key, l.cfg.AuthRate, l.cfg.burst()) {
		return nil
	}
	return refuse(CodeTooManyConnections, ReasonThrottled,
		fmt.Sprintf("too many authentication requests from %s (limits.auth_rate is %g per second, limits.auth_burst %g)", key, l.cfg.AuthRate, l.cfg.burst()),
		"Slow down and retry, or raise limits.auth_rate.")
}

// acquire takes one session slot (limits.sessions_per_principal) for
// principal. The returned release gives it back when the session ends.
func (l *limiter) acquire(principal string) (release func(), err *ClientError) {
	l.mu.Lock()
	defer l.mu.Unlock()
	key := principalKey(principal)
	b := l.bucket(key, l.now())
	if max := l.cfg.SessionsPerPrincipal; max > 0 && b.sessions >= max {
		return nil, refuse(CodeTooManyConnections, ReasonThrottled,
			fmt.Sprintf("principal %q has too many sessions (limits.sessions_per_principal is %d)", principal, max),
			"Close idle sessions, or raise limits.sessions_per_principal.")
	}
	b.sessions++
	var once sync.Once
	return func() {
		once.Do(func() {
			l.mu.Lock()
			b.sessions--
			l.mu.Unlock()
		})
	}, nil
}

// cancelAllowed reports whether uid may still have a cancel key looked up.
// It spends nothing: wrongCancel does, for keys that named no session.
func (l *limiter) cancelAllowed(uid uint32) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	b := l.buckets[cancelKeyOf(uid)]
	if b == nil {
		return true
	}
	return min(float64(cancelBurst), b.tokens+l.now().Sub(b.last).Seconds()*cancelRate) >= 1
}

// wrongCancel spends one of uid's wrong-cancel-key tokens.
func (l *limiter) wrongCancel(uid uint32) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.take(cancelKeyOf(uid), cancelRate, cancelBurst)
}

// size is the number of buckets held, for tests.
func (l *limiter) size() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.buckets)
}
