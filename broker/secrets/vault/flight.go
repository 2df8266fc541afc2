package vault

import (
	"context"
	"sync"
)

// flightGroup runs at most one call per key at a time; callers that ask for
// a key already in flight wait for, and share, its result. The call runs on
// its own goroutine, detached from any one caller, so a caller that gives up
// (its context ends) does not fail the others.
type flightGroup struct {
	mu sync.Mutex
	m  map[string]*flight
	// track registers a new call with the owner's WaitGroup, or reports
	// false when the owner is closed; done is called when the call ends.
	track func() bool
	done  func()
}

type flight struct {
	done chan struct{}
	val  any
	err  error
}

// do returns fn's result for key, or ctx's error if ctx ends first.
func (g *flightGroup) do(ctx context.Context, key string, fn func() (any, error)) (any, error) {
	g.mu.Lock()
	f, ok := g.m[key]
	if !ok {
		if g.m == nil {
			g.m = map[string]*flight{}
		}
		if !g.track() {
			g.mu.Unlock()
			return nil, errClosed
		}
		f = &flight{done: make(chan struct{})}
		g.m[key] = f
		go func() {
			defer g.done()
			f.val, f.err = fn()
			g.mu.Lock()
			delete(g.m, key)
			g.mu.Unlock()
			close(f.done)
		}()
	}
	g.mu.Unlock()
	select {
	case <-f.done:
		return f.val, f.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}
