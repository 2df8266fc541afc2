package broker

import (
	"bytes"
	"testing"
)

// A message to inspect that announces far more than has arrived costs
// memory in proportion to the bytes that arrived, never to the announced
// size; when it is through, the grown buffer is dropped and its budget given
// back.
func TestRelayReaderGrowsAsBytesArrive(t *testing.T) {
	const announced = 16 << 20
	client, server := socketPair(t)
	defer client.Close()
	defer server.Close()
	budget := &bufferBudget{}
	budget.setLimits(&Config{Limits: LimitsConfig{MaxMessageBytes: 32 << 20, BufferMemory: 64 << 20}})
	rd := newRelayReader(server, budget)
	defer rd.release()
	fs := &frameScanner{maxMsg: 32 << 20}
	fs.want['Q'] = true
	var inspected int
	fs.inspect = func(_ byte, body []byte) error { inspected = len(body); return nil }

	body := bytes.Repeat([]byte{'x'}, announced-5)
	body[len(body)-1] = 0
	msg := append(append([]byte{'Q'}, u32(announced-1)...), body...)
	// The header and the first 100 KiB; then the rest.
	sent := 5 + 100<<10
	go func() { _, _ = client.Write(msg[:sent]) }()
	got := 0
	for got < sent {
		m, err := rd.read()
		if err != nil {
			t.Fatal(err)
		}
		got += m
		fwd, need, err := fs.scan(rd.pending())
		if err != nil || fwd != 0 || need != announced {
			t.Fatalf("scan: %d %d %v", fwd, need, err)
		}
		if err := rd.room(need, nil); err != nil {
			t.Fatal(err)
		}
	}
	if n := len(rd.bytes()); n > 4*got {
		t.Fatalf("%d bytes arrived of a message announcing %d, and the buffer is %d bytes", got, announced, n)
	}
	if c := budget.inUse.Load(); c != int64(len(rd.bytes())) {
		t.Fatalf("budget counts %d bytes, the buffer is %d", c, len(rd.bytes()))
	}
	go func() { _, _ = client.Write(msg[sent:]) }()
	for inspected == 0 {
		if _, err := rd.read(); err != nil {
			t.Fatal(err)
		}
		fwd, need, err := fs.scan(rd.pending())
		if err != nil {
			t.Fatal(err)
		}
		rd.consume(fwd)
		if err := rd.room(need, nil); err != nil {
			t.Fatal(err)
		}
	}
	if inspected != announced-5 || rd.big != nil || budget.inUse.Load() != 0 || rd.charged != 0 {
		t.Fatalf("inspected %d bytes; big buffer kept: %v; budget still holds %d", inspected, rd.big != nil, budget.inUse.Load())
	}
}
