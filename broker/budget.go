package broker

import (
	"errors"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
)

// bufferBudget is limits.buffer_memory: the bytes all sessions together may
// hold in buffers grown past relayBufSize to assemble a message to inspect.
// A reader that would go over it waits (its session stops reading: TCP-style
// backpressure) until other readers give bytes back.
//
// Waiting could deadlock: several sessions each holding part of the budget,
// each waiting for more to finish its message. So the budget is split: the
// general part (limit − maxMsg) is shared, and a reserve of maxMsg bytes is
// held by one reader at a time. A reader the general part cannot serve
// takes the reserve when it is free, moving its bytes there; since no
// message is larger than maxMsg (limits.max_message_bytes ≤
// limits.buffer_memory is validated), the holder can always finish its
// message, as far as memory goes, and then gives the reserve back.
//
// The zero value uses the defaults; setLimits applies the configuration.
type bufferBudget struct {
	mu      sync.Mutex
	limit   int64         // limits.buffer_memory; 0 = DefaultBufferMemory
	reserve int64         // limits.max_message_bytes; 0 = DefaultMaxMessageBytes
	used    int64         // bytes held from the general part
	holder  *relayReader  // the reader holding the reserve, or nil
	held    int64         // bytes the holder holds in the reserve
	wake    chan struct{} // closed (and replaced) when bytes are given back

	// growers holds a token per buffer growth in progress (see growSlots).
	growOnce sync.Once
	growers  chan struct{}

	inUse    atomic.Int64  // used + held, for the gauge
	waits    atomic.Uint64 // times a reader had to wait
	tooLarge [2]atomic.Uint64
}

// budgetPoll is how often a waiting reader checks that its session still
// wants it, besides being woken when bytes are given back.
const budgetPoll = 100 * time.Millisecond

// errBudgetAbandoned ends a wait for buffer memory whose session ended.
var errBudgetAbandoned = errors.New("session ended while waiting for buffer memory")

func (b *bufferBudget) setLimits(cfg *Config) {
	b.mu.Lock()
	b.limit, b.reserve = cfg.Limits.bufferMemory(), int64(cfg.maxMessageBytes())
	b.mu.Unlock()
	b.wakeAll()
}

func (b *bufferBudget) limits() (limit, reserve int64) {
	limit, reserve = b.limit, b.reserve
	if limit <= 0 {
		limit = DefaultBufferMemory
	}
	if reserve <= 0 {
		reserve = DefaultMaxMessageBytes
	}
	return limit, min(limit, reserve)
}

// take makes r's charge size bytes (r's buffer grows from r.charged bytes
// to size), waiting while the budget cannot give that much. It gives up
// when gone (polled) reports that r's session has ended.
func (b *bufferBudget) take(r *relayReader, size int64, gone func() bool) error {
	waited := false
	b.mu.Lock()
	for {
		limit, reserve := b.limits()
		if b.holder == r {
			b.held = size
			break
		}
		if b.used-r.charged+size <= limit-reserve {
			b.used += size - r.charged
			break
		}
		// A message larger than the reserve exists only when a reload
		// lowered the limits under a session that had already accepted
		// its header: it gets the reserve too, bounded by the old limit.
		if b.holder == nil {
			b.used -= r.charged
			b.holder, b.held = r, size
			break
		}
		if !waited {
			waited = true
			b.waits.Add(1)
		}
		if b.wake == nil {
			b.wake = make(chan struct{})
		}
		wake := b.wake
		b.mu.Unlock()
		t := time.NewTimer(budgetPoll)
		select {
		case <-wake:
		case <-t.C:
		}
		t.Stop()
		if gone != nil && gone() {
			return errBudgetAbandoned
		}
		b.mu.Lock()
	}
	r.charged = size
	b.inUse.Store(b.used + b.held)
	b.mu.Unlock()
	return nil
}

// giveBack returns everything r holds.
func (b *bufferBudget) giveBack(r *relayReader) {
	if r.charged == 0 {
		return
	}
	b.mu.Lock()
	if b.holder == r {
		b.holder, b.held = nil, 0
	} else {
		b.used -= r.charged
	}
	r.charged = 0
	b.inUse.Store(b.used + b.held)
	b.mu.Unlock()
	b.wakeAll()
}

func (b *bufferBudget) wakeAll() {
	b.mu.Lock()
	if b.wake != nil {
		close(b.wake)
		b.wake = nil
	}
	b.mu.Unlock()
}

// growSlots is a semaphore around the allocation and copy of a grown
// buffer, with GOMAXPROCS−1 tokens (at least 1). Growing copies and zeroes
// up to limits.max_message_bytes in runtime routines that cannot be
// preempted, and drives the garbage collector (assists, mark workers):
// when dozens of sessions assemble large messages at once, those copies
// held every P for tens of milliseconds at a time, and a login on the same
// agent waited for a P at each step — 2–4 s for a login with a query that
// took 0.2–0.4 s straight to PostgreSQL (TestHostileMemoryBounded). With
// the semaphore a P stays free for everything else; a session waiting
// for a token is parked, holding no P, and holds no budget it has not
// already been given (the token is taken after the budget, never while
// waiting for it, so it cannot deadlock with the reserve).
func (b *bufferBudget) growSlots() chan struct{} {
	b.growOnce.Do(func() { b.growers = make(chan struct{}, max(1, runtime.GOMAXPROCS(0)-1)) })
	return b.growers
}

// BufferStats is what the relay's buffers hold, for metrics.
type BufferStats struct {
	// Bytes held now in buffers grown past the standard read buffer,
	// counted against Limit (limits.buffer_memory).
	Bytes, Limit int64
	// Waits counts the times a session stopped reading because the
	// budget was spent (backpressure), since start.
	Waits uint64
	// TooLargeFromClient and TooLargeFromServer count messages refused for
	// announcing more than limits.max_message_bytes, since start.
	TooLargeFromClient, TooLargeFromServer uint64
}

// BufferStats reports the relay's buffer memory (limits.buffer_memory).
func (s *Server) BufferStats() BufferStats {
	s.budget.mu.Lock()
	limit, _ := s.budget.limits()
	s.budget.mu.Unlock()
	return BufferStats{
		Bytes: s.budget.inUse.Load(), Limit: limit, Waits: s.budget.waits.Load(),
		TooLargeFromClient: s.budget.tooLarge[0].Load(), TooLargeFromServer: s.budget.tooLarge[1].Load(),
	}
}
