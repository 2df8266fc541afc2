package broker

import (
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pgward/pgward/broker/secrets"
)

// parkedPair parks one end of a socket pair and returns the other, which
// sees the Terminate and EOF when pgward closes the parked connection.
func parkedPair(t *testing.T, p *reusePool, k reuseKey, lease *secrets.Lease, cfg *ReuseConfig) net.Conn {
	t.Helper()
	a, b := socketPair(t)
	if !p.put(k, &upstreamConn{conn: a, params: map[string]string{}}, lease, cfg) {
		t.Fatal("put refused")
	}
	return b
}

func waitClosed(t *testing.T, c net.Conn) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("parked connection not closed: %v", err)
	}
	if string(b) != "X\x00\x00\x00\x04" {
		t.Fatalf("server saw %q before EOF, want a Terminate", b)
	}
}

// TestReuseLeaseEnds: a parked connection of a dynamic credential is closed
// when its lease ends, and its lease reference is released; a connection
// whose lease already ended is never parked nor handed out.
func TestReuseLeaseEnds(t *testing.T) {
	var p reusePool
	done := make(chan struct{})
	var released atomic.Int32
	lease := &secrets.Lease{ID: "l1", Done: done, Release: func() { released.Add(1) }}
	k := reuseKey{upstream: "u", role: "r"}
	cfg := &ReuseConfig{}
	srv := parkedPair(t, &p, k, lease, cfg)
	close(done)
	waitClosed(t, srv)
	// The lease reference is given back right after the connection closes.
	for deadline := time.Now().Add(5 * time.Second); released.Load() == 0 && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond)
	}
	if p.idle() != 0 || released.Load() != 1 {
		t.Fatalf("idle %d, releases %d; want 0, 1", p.idle(), released.Load())
	}
	a, _ := socketPair(t)
	if p.put(k, &upstreamConn{conn: a}, lease, cfg) {
		t.Fatal("parked a connection whose lease has ended")
	}
	p.closeAll()
}

// TestReuseIdleTimeoutAndBound: idle_timeout closes parked connections,
// max_idle bounds them, take is LIFO, closeAll closes the rest.
func TestReuseIdleTimeoutAndBound(t *testing.T) {
	var p reusePool
	k := reuseKey{upstream: "u", role: "r"}
	cfg := &ReuseConfig{MaxIdle: 2, IdleTimeout: 200 * time.Millisecond}
	s1 := parkedPair(t, &p, k, nil, cfg)
	waitClosed(t, s1)
	if p.idle() != 0 {
		t.Fatalf("idle %d after idle_timeout", p.idle())
	}
	cfg.IdleTimeout = time.Minute
	parkedPair(t, &p, k, nil, cfg)
	parkedPair(t, &p, k, nil, cfg)
	last := p.m[k][len(p.m[k])-1].up
	a, _ := socketPair(t)
	if p.put(k, &upstreamConn{conn: a}, nil, cfg) {
		t.Fatal("max_idle exceeded")
	}
	if e := p.take(reuseKey{upstream: "other"}); e != nil {
		t.Fatal("took another key's connection")
	}
	e := p.take(k)
	if e == nil || e.up != last {
		t.Fatal("take is not LIFO")
	}
	e.up.conn.Close()
	p.closeAll()
	if p.idle() != 0 {
		t.Fatal("closeAll left connections")
	}
}
