package broker

import (
	"errors"
	"sync"
	"testing"
	"time"
)

// Sessions that each hold part of the budget and each need more to finish
// their message do not deadlock: the reserve lets one finish at a time.
// A session that stops reading while waiting is counted, and a wait ends
// when its session is gone.
func TestBufferBudgetBackpressureWithoutDeadlock(t *testing.T) {
	const msgMax = 1 << 20
	b := &bufferBudget{}
	b.setLimits(&Config{Limits: LimitsConfig{MaxMessageBytes: msgMax, BufferMemory: 2 * msgMax}})
	readers := make([]*relayReader, 4)
	for i := range readers {
		readers[i] = &relayReader{budget: b}
		// 4 × 256 KiB: the general part (2 MiB − the 1 MiB reserve) is spent.
		if err := b.take(readers[i], msgMax/4, nil); err != nil {
			t.Fatal(err)
		}
	}
	if got := b.inUse.Load(); got != msgMax {
		t.Fatalf("in use %d", got)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var peak int64
	for _, r := range readers {
		wg.Go(func() {
			if err := b.take(r, msgMax, nil); err != nil {
				t.Error(err)
				return
			}
			mu.Lock()
			peak = max(peak, b.inUse.Load())
			mu.Unlock()
			time.Sleep(10 * time.Millisecond) // the rest of the message arrives
			b.giveBack(r)
		})
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("deadlock: sessions holding part of the budget could not finish their messages")
	}
	if b.inUse.Load() != 0 || b.holder != nil || b.used != 0 {
		t.Fatalf("after all gave back: in use %d, holder %v, used %d", b.inUse.Load(), b.holder != nil, b.used)
	}
	if peak > 2*msgMax {
		t.Fatalf("peak %d over the budget %d", peak, 2*msgMax)
	}
	if b.waits.Load() < 3 {
		t.Fatalf("%d waits; the budget was spent, so at least 3 of 4 sessions should have waited", b.waits.Load())
	}

	// The budget spent by a holder that never finishes: a waiter leaves
	// when its session is gone.
	s1, s2, waiter := &relayReader{budget: b}, &relayReader{budget: b}, &relayReader{budget: b}
	for _, r := range []*relayReader{s1, s2} { // the general part, then the reserve
		if err := b.take(r, msgMax, nil); err != nil {
			t.Fatal(err)
		}
	}
	left := time.Now().Add(300 * time.Millisecond)
	began := time.Now()
	err := b.take(waiter, msgMax/2, func() bool { return time.Now().After(left) })
	if !errors.Is(err, errBudgetAbandoned) || time.Since(began) > 2*time.Second || waiter.charged != 0 {
		t.Fatalf("wait of a gone session: %v after %v", err, time.Since(began))
	}
	b.giveBack(s1)
	b.giveBack(s2)
	if b.inUse.Load() != 0 {
		t.Fatalf("in use %d", b.inUse.Load())
	}
}
