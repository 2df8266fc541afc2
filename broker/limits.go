package broker

import (
	"fmt"
	"sync"
	"time"
)

// limiter throttles authentication requests and caps sessions per
// principal, so a flood from one caller cannot exhaust the secrets backend or
// the upstream's connection slots for everyone else.
type limiter struct {
	mu      sync.Mutex
	cfg     LimitsConfig
	buckets map[string]*bucket
	now     func() time.Time
}

type bucket struct {
	tokens   float64
	last     time.Time
	sessions int
}

func newLimiter(cfg LimitsConfig) *limiter {
	return &limiter{cfg: cfg, buckets: map[string]*bucket{}, now: time.Now}
}

func (l *limiter) setConfig(cfg LimitsConfig) {
	l.mu.Lock()
	l.cfg = cfg
	l.mu.Unlock()
}

// acquire takes one authentication token and one session slot for key. The
// returned release gives the slot back when the session ends.
func (l *limiter) acquire(key string) (release func(), err *ClientError) {
	l.mu.Lock()
	defer l.mu.Unlock()
	b := l.buckets[key]
	now := l.now()
	burst := float64(l.cfg.AuthBurst)
	if burst == 0 {
		burst = max(1, 2*l.cfg.AuthRate)
	}
	if b == nil {
		b = &bucket{tokens: burst, last: now}
		l.buckets[key] = b
	}
	if l.cfg.AuthRate > 0 {
		b.tokens = min(burst, b.tokens+now.Sub(b.last).Seconds()*l.cfg.AuthRate)
		b.last = now
		if b.tokens < 1 {
			return nil, refuse(CodeTooManyConnections, ReasonThrottled,
				fmt.Sprintf("too many authentication requests for principal %q (limits.auth_rate is %g per second)", key, l.cfg.AuthRate),
				"Slow down and retry, or raise limits.auth_rate.")
		}
		b.tokens--
	}
	if max := l.cfg.SessionsPerPrincipal; max > 0 && b.sessions >= max {
		return nil, refuse(CodeTooManyConnections, ReasonThrottled,
			fmt.Sprintf("principal %q has too many sessions (limits.sessions_per_principal is %d)", key, max),
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
