package exporter

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/pgward/pgward/broker"
)

// Refusal aggregation. A caller that holds no grant can loop on refused
// startups, wrong cancel keys or connections over its slot limit as fast as
// the machine lets it; a full audit line each (about 1.3 KB) would rotate the
// retained history away within minutes, or fill the disk and so refuse every
// granted app (58030). So refusals get their full event only within an
// allowance per caller — refusalBurst at once, then refusalRate per second
// per (uid, cgroup, refused event, reason), and refusalGlobalRate per second
// over all callers — and beyond it they are counted into one hash-chained
// db.refusal.summary event per (uid, cgroup, refused event, reason) and
// interval (refusalInterval), carrying the count and the first and last
// times. Metrics still count every attempt; the summaries' counts add up to
// every refusal that got no event of its own.
//
// Connections refused for want of a slot (53300 before any startup was
// read) have no event of their own: they are only summarised.
//
// Bound: a single flooding caller writes at most refusalRate full events per
// second plus one summary per refusalInterval (about 1.5 KB/s whatever its
// rate); all callers together at most refusalGlobalRate full events per
// second plus one summary per key and interval, with at most maxRefusalKeys
// keys (further callers share one overflow key).
const (
	refusalBurst       = 10
	refusalRate        = 1.0
	refusalGlobalBurst = 100
	refusalGlobalRate  = 20.0
	refusalInterval    = 10 * time.Second
	maxRefusalKeys     = 1024
)

// What a summary summarises (its "refused" field).
const (
	refusedSession    = EventSessionStart   // db.session.start refusals (PGW00W)
	refusedCancel     = EventCancel         // rejected CancelRequests (PGW04W)
	refusedConnection = "connection"        // 53300 for want of a connection slot
	overflowCgroup    = "(other callers)"   // the key of callers past maxRefusalKeys
	unknownCaller     = "(unverified)"      // refusals before the caller was identified
	refusalsSummary   = EventRefusalSummary // for the grep
)

type refusalKey struct {
	refused string
	reason  string
	uid     uint32
	cgroup  string // the caller's cgroup; unknownCaller or overflowCgroup
}

type refusalBucket struct {
	tokens float64
	last   time.Time
	// The refusals aggregated since the last summary.
	count       int64
	first, prev time.Time
	sample      broker.Identity // the first aggregated caller
	service     string
	user        string
	sqlstate    string
	message     string
}

// refusals decides which refusals get a full event and keeps the counts of
// the others until their summary is written.
type refusals struct {
	mu      sync.Mutex
	buckets map[refusalKey]*refusalBucket
	global  float64
	glast   time.Time
	timer   *time.Timer
	armed   bool
	closed  bool
	audit   *Audit
	m       *Metrics
	log     *slog.Logger
}

func newRefusals(a *Audit, m *Metrics, log *slog.Logger) *refusals {
	return &refusals{buckets: map[refusalKey]*refusalBucket{}, global: refusalGlobalBurst, audit: a, m: m, log: log}
}

// refusal is one refusal to decide on.
type refusal struct {
	refused  string
	reason   string
	id       *broker.Identity
	known    bool // id was verified (or read from SO_PEERCRED)
	service  string
	user     string
	sqlstate string
	message  string
	// summaryOnly: no full event exists for it (slot refusals).
	summaryOnly bool
}

// full says whether r gets a full event; if not, it is counted for the
// summary of its key.
func (g *refusals) full(now time.Time, r refusal) bool {
	k := refusalKey{refused: r.refused, reason: r.reason, uid: r.id.UID, cgroup: r.id.Cgroup}
	if !r.known {
		k.uid, k.cgroup = 0, unknownCaller
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	b := g.buckets[k]
	if b == nil {
		if len(g.buckets) >= maxRefusalKeys {
			g.sweepLocked(now)
		}
		if len(g.buckets) >= maxRefusalKeys {
			k = refusalKey{refused: r.refused, reason: r.reason, cgroup: overflowCgroup}
			b = g.buckets[k]
		}
		if b == nil {
			b = &refusalBucket{tokens: refusalBurst, last: now}
			g.buckets[k] = b
		}
	}
	b.tokens = min(refusalBurst, b.tokens+now.Sub(b.last).Seconds()*refusalRate)
	b.last = now
	g.global = min(refusalGlobalBurst, g.global+now.Sub(g.glast).Seconds()*refusalGlobalRate)
	g.glast = now
	if !r.summaryOnly && k.cgroup != overflowCgroup && b.tokens >= 1 && g.global >= 1 {
		b.tokens--
		g.global--
		return true
	}
	if b.count == 0 {
		b.first = now
		b.sample = *r.id
		b.service, b.user, b.sqlstate, b.message = r.service, r.user, r.sqlstate, r.message
	}
	b.count++
	b.prev = now
	if g.m != nil {
		g.m.hostile.refusalsSummarized.Inc()
	}
	if !g.armed && !g.closed {
		g.armed = true
		if g.timer == nil {
			g.timer = time.AfterFunc(refusalInterval, g.flush)
		} else {
			g.timer.Reset(refusalInterval)
		}
	}
	return false
}

// sweepLocked drops buckets that hold no count and have refilled.
func (g *refusals) sweepLocked(now time.Time) {
	for k, b := range g.buckets {
		if b.count == 0 && b.tokens+now.Sub(b.last).Seconds()*refusalRate >= refusalBurst {
			delete(g.buckets, k)
		}
	}
}

type refusalSummary struct {
	key refusalKey
	b   refusalBucket
}

// flush writes a summary for every key with refusals counted.
func (g *refusals) flush() {
	now := time.Now()
	g.mu.Lock()
	g.armed = false
	var out []refusalSummary
	for k, b := range g.buckets {
		if b.count > 0 {
			out = append(out, refusalSummary{k, *b})
			b.count = 0
		}
	}
	g.sweepLocked(now)
	g.mu.Unlock()
	for i := range out {
		if err := g.audit.refusalSummary(now, &out[i]); err != nil {
			g.log.Error("audit: could not write a refusal summary", "refused", out[i].key.refused,
				"reason", out[i].key.reason, "count", out[i].b.count, "error", err)
		}
	}
}

// close writes the pending summaries; later refusals are only counted.
func (g *refusals) close() {
	g.mu.Lock()
	if g.closed {
		g.mu.Unlock()
		return
	}
	g.closed = true
	if g.timer != nil {
		g.timer.Stop()
	}
	g.mu.Unlock()
	g.flush()
}

// SlotRefused counts a connection refused for want of a slot (53300) and
// summarises it in the audit trail (broker.SlotObserver).
func (o *Observer) SlotRefused(_ context.Context, r *broker.SlotRefusal) {
	o.m.hostile.slotRefused(r.Reason)
	if o.refusals == nil {
		return
	}
	id := r.Peer
	o.refusals.full(time.Now(), refusal{refused: refusedConnection, reason: r.Reason, id: &id, known: r.PeerKnown,
		sqlstate: broker.CodeTooManyConnections, message: "no connection slot (" + r.Reason + ")", summaryOnly: true})
}

// Close writes the refusal summaries still pending. Call it before the
// audit sink's Close. It is idempotent.
func (o *Observer) Close() error {
	if o.refusals != nil {
		o.refusals.close()
	}
	return nil
}

func sessionRefusal(s *broker.SessionInfo) refusal {
	reason := string(s.Refusal)
	if reason == "" {
		reason = s.Code
	}
	return refusal{refused: refusedSession, reason: reason, id: &s.Identity, known: s.Identity.PID != 0,
		service: s.Upstream, user: s.User, sqlstate: s.Code, message: s.Error}
}

func cancelRefusal(c *broker.CancelEvent) refusal {
	return refusal{refused: refusedCancel, reason: c.Reason, id: &c.Caller, known: c.Reason != "identity" && c.Caller.PID != 0}
}
