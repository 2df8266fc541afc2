package broker

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"strings"
	"testing"
)

func msg(typ byte, body ...[]byte) []byte {
	b := []byte{typ, 0, 0, 0, 0}
	for _, p := range body {
		b = append(b, p...)
	}
	binary.BigEndian.PutUint32(b[1:], uint32(len(b)-1))
	return b
}

func cstr(s string) []byte { return append([]byte(s), 0) }

func u16(v uint16) []byte { return binary.BigEndian.AppendUint16(nil, v) }
func u32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }

func testSession() *session {
	return &session{srv: &Server{}, obs: NopObserver{}, ctx: context.Background()}
}

// feed runs a stream through a scanner in chunks the way the relay does,
// returning the forwarded bytes.
func feed(t testing.TB, fs *frameScanner, stream []byte, chunks []int) ([]byte, error) {
	var out, buf []byte
	pos := 0
	for ci := 0; pos < len(stream); ci++ {
		n := len(stream) - pos
		if len(chunks) > 0 {
			n = min(n, max(1, chunks[ci%len(chunks)]))
		}
		buf = append(buf, stream[pos:pos+n]...)
		pos += n
		fwd, need, err := fs.scan(buf)
		out = append(out, buf[:fwd]...)
		buf = buf[fwd:]
		if err != nil {
			return out, err
		}
		if need > fs.maxMsg {
			t.Fatalf("asked for %d bytes, over the limit", need)
		}
	}
	return out, nil
}

func TestFrameScannerAuditsPipeline(t *testing.T) {
	sess := testSession()
	var stream []byte
	stream = append(stream, msg('Q', cstr("select 1"))...)
	stream = append(stream, msg('P', cstr("s1"), cstr("select $1::int"), u16(1), u32(23))...)
	stream = append(stream, msg('B', cstr(""), cstr("s1"), u16(1), u16(0), u16(2), u32(2), []byte("42"), u32(0xffffffff), u16(0))...)
	stream = append(stream, msg('d', bytes.Repeat([]byte("c"), 70000))...) // streamed, never buffered whole
	stream = append(stream, msg('E', cstr(""), u32(0))...)
	stream = append(stream, msg('S')...)
	for _, chunks := range [][]int{nil, {1}, {3, 7}, {4096}} {
		tr := newTracker()
		fs := &frameScanner{maxMsg: 1 << 20}
		for _, c := range []byte{'Q', 'P', 'B', 'E', 'C', 'F', 'S', 'D', 'X'} {
			fs.want[c] = true
		}
		fs.inspect = func(typ byte, body []byte) error {
			err := sess.frontendMessage(tr, typ, body)
			if typ == 'Q' && err == nil {
				q := tr.batch[len(tr.batch)-1]
				q.Text = strings.Clone(q.Text) // points into the stream buffer
			}
			return err
		}
		out, err := feed(t, fs, stream, chunks)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(out, stream) {
			t.Fatalf("chunks %v: forwarded %d of %d bytes", chunks, len(out), len(stream))
		}
		events := tr.batch
		// The Bind and its Execute share one event (in the Execute's place);
		// a Bind read without its Execute would have its own.
		if len(events) != 2 || events[0].Text != "select 1" || events[1].Text != "select $1::int" || events[1].Statement != "s1" ||
			events[1].BindOnly || len(events[1].Params) != 2 || string(events[1].Params[0].Value) != "42" || events[1].Params[0].OID != 23 ||
			events[1].Params[1].Value != nil {
			t.Fatalf("chunks %v: events %+v", chunks, events)
		}
	}
}

// Hostile lengths: whatever a header announces, the scanner either frames
// it as the server will or stops with an error, and never asks for a buffer
// larger than maxMsg. Lengths under 4 (0, 1…3, and every negative int32:
// 0x80000000…0xffffffff) are malformed for any type. An uninspected message
// may announce up to 2^31-1 and is streamed; an inspected one over maxMsg
// is a *MessageTooLargeError before a byte of its body is needed. A length
// that wrapped past 2^32 (CVE-2024-27304) is only a small length here: the
// scanner frames exactly what the server will read, which
// FuzzRelayNoSmuggling checks.
func TestFrameScannerHostileLengths(t *testing.T) {
	const maxMsg = 1 << 20
	type want int
	const (
		protocol want = iota
		tooLarge
		streamed
		needed
	)
	cases := []struct {
		typ byte
		l   uint32
		w   want
	}{
		{'Q', 0, protocol}, {'Q', 1, protocol}, {'Q', 3, protocol}, {'d', 0, protocol}, {'d', 3, protocol},
		{'Q', 0x80000000, protocol}, {'d', 0x80000000, protocol}, {'Q', 0xffffffff, protocol}, {'d', 0xfffffffc, protocol},
		{'Q', 0x7fffffff, tooLarge}, {'B', 1 << 30, tooLarge}, {'Q', maxMsg, tooLarge},
		{'d', 0x7fffffff, streamed}, {'D', 1 << 30, streamed}, {'d', maxMsg, streamed},
		{'Q', maxMsg - 1, needed}, {'P', 1 << 16, needed},
	}
	for _, c := range cases {
		fs := &frameScanner{maxMsg: maxMsg}
		for _, typ := range []byte{'Q', 'P', 'B', 'E', 'S'} {
			fs.want[typ] = true
		}
		fs.inspect = func(byte, []byte) error { t.Fatalf("%q %#x: inspected", c.typ, c.l); return nil }
		buf := append(append([]byte{c.typ}, u32(c.l)...), 1, 2, 3)
		fwd, need, err := fs.scan(buf)
		var tl *MessageTooLargeError
		switch c.w {
		case protocol:
			if !errors.Is(err, errProtocol) || fwd != 0 || need != 0 {
				t.Errorf("%q %#x: %d %d %v; want a protocol error", c.typ, c.l, fwd, need, err)
			}
		case tooLarge:
			if !errors.As(err, &tl) || tl.Size != 1+int64(c.l) || tl.Limit != maxMsg || fwd != 0 || need != 0 ||
				!strings.Contains(err.Error(), "limits.max_message_bytes") {
				t.Errorf("%q %#x: %d %d %v; want MessageTooLargeError", c.typ, c.l, fwd, need, err)
			}
		case streamed:
			if err != nil || fwd != len(buf) || need != 0 || fs.skip != 1+int(c.l)-len(buf) || fs.atBoundary() {
				t.Errorf("%q %#x: %d %d %v skip %d; want it streamed", c.typ, c.l, fwd, need, err, fs.skip)
			}
		case needed:
			if err != nil || fwd != 0 || need != 1+int(c.l) || need > maxMsg {
				t.Errorf("%q %#x: %d %d %v; want need %d", c.typ, c.l, fwd, need, err, 1+c.l)
			}
		}
	}
	// Every header a 32-bit length can make, sampled: no panic, no need
	// over maxMsg, an error exactly for lengths under 4 or inspected
	// messages over maxMsg.
	for i := range uint64(1 << 16) {
		l := uint32(i*0x10001 + i>>3)
		for _, typ := range []byte{'Q', 'd'} {
			fs := &frameScanner{maxMsg: maxMsg}
			fs.want['Q'] = true
			fs.inspect = func(byte, []byte) error { return nil }
			_, need, err := fs.scan(append([]byte{typ}, u32(l)...))
			bad := int32(l) < 4 || typ == 'Q' && int64(l)+1 > maxMsg
			if need > maxMsg || (err != nil) != bad {
				t.Fatalf("%q %#x: need %d err %v", typ, l, need, err)
			}
		}
	}
}

// FuzzFrontendStream: whatever the client sends, the scanner never panics,
// forwards only whole declared frames (or streamed pieces of them), and
// forwards the same bytes however the stream is split into reads.
func FuzzFrontendStream(f *testing.F) {
	f.Add(append(msg('Q', cstr("select 1")), msg('X')...), uint8(3))
	f.Add(append(msg('P', cstr("a"), cstr("select $1"), u16(1), u32(25)), msg('B', cstr(""), cstr("a"), u16(0), u16(1), u32(1), []byte("x"), u16(0))...), uint8(1))
	f.Add([]byte{'Q', 0x7f, 0xff, 0xff, 0xff}, uint8(5))
	f.Add([]byte{'B', 0, 0, 0, 8, 0, 0, 0xff, 0xff}, uint8(2))
	f.Add([]byte{'d', 0x7f, 0xff, 0xff, 0xff, 'Q', 0, 0, 0, 5}, uint8(4))
	f.Add([]byte{'Q', 0x80, 0, 0, 0, 'Q', 0xff, 0xff, 0xff, 0xff}, uint8(1))
	f.Add([]byte{'D', 0, 0, 0, 3}, uint8(1))
	f.Fuzz(func(t *testing.T, stream []byte, split uint8) {
		run := func(chunks []int) ([]byte, error) {
			sess := testSession()
			tr := newTracker()
			fs := &frameScanner{maxMsg: 1 << 16}
			for _, c := range []byte{'Q', 'P', 'B', 'E', 'C', 'F', 'S', 'D', 'X'} {
				fs.want[c] = true
			}
			fs.inspect = func(typ byte, body []byte) error {
				return sess.frontendMessage(tr, typ, body)
			}
			return feed(t, fs, stream, chunks)
		}
		whole, errWhole := run(nil)
		pieces, errPieces := run([]int{int(split%16) + 1})
		if (errWhole == nil) != (errPieces == nil) {
			// A split may stop earlier only because less was read.
			if errWhole != nil && len(pieces) > len(whole) {
				t.Fatalf("split forwarded past the error: %d > %d", len(pieces), len(whole))
			}
		}
		if errWhole == nil && errPieces == nil && !bytes.Equal(whole, pieces) {
			t.Fatalf("forwarded bytes depend on the split")
		}
		if !bytes.HasPrefix(stream, whole) {
			t.Fatal("forwarded bytes are not the stream's prefix")
		}
		// Forwarded bytes end on a frame boundary unless a frame is streamed.
		checkFrames(t, whole)
	})
}

func checkFrames(t *testing.T, b []byte) {
	for len(b) >= 5 {
		l := int(int32(binary.BigEndian.Uint32(b[1:])))
		if l < 4 {
			t.Fatalf("forwarded a frame of length %d", l)
		}
		if 1+l > len(b) {
			return // streamed tail of an uninspected message
		}
		b = b[1+l:]
	}
}

// FuzzBackendStream: server bytes complete pending statements without
// panicking, whatever their order.
func FuzzBackendStream(f *testing.F) {
	f.Add(append(append(msg('C', cstr("SELECT 1")), msg('E', []byte("CXX000\x00Mboom\x00\x00"))...), msg('Z', []byte{'I'})...), uint8(2))
	f.Add(append(msg('t', u16(1), u32(23)), msg('s')...), uint8(1))
	f.Fuzz(func(t *testing.T, stream []byte, split uint8) {
		sess := testSession()
		tr := newTracker()
		si := &stmtInfo{text: "x"}
		tr.queue = []pending{{kind: pendDescribe, stmt: si}, {kind: pendExecute, q: &QueryEvent{}}, {kind: pendSync}, {kind: pendQuery, q: &QueryEvent{}}}
		fs := &frameScanner{maxMsg: 1 << 16}
		for _, c := range []byte{'C', 'E', 'I', 's', 'Z', 't'} {
			fs.want[c] = true
		}
		for _, c := range []byte{'1', '2', '3', 'n', 'T', 'G', 'W'} {
			fs.peek[c] = true
		}
		var done []pending
		fs.inspect = func(typ byte, body []byte) error {
			done = sess.backendMessage(tr, typ, body, done)
			return nil
		}
		out, _ := feed(t, fs, stream, []int{int(split%16) + 1})
		if !bytes.HasPrefix(stream, out) {
			t.Fatal("forwarded bytes are not the stream's prefix")
		}
		if len(done)+len(tr.queue)-tr.head > 4 {
			t.Fatalf("statements multiplied: %d done, %d pending", len(done), len(tr.queue)-tr.head)
		}
	})
}
