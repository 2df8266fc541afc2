package broker

import (
	"encoding/binary"
	"fmt"
)

// frameScanner walks the protocol messages of one relay direction. It reads
// only frame headers, except for the message types it is told to inspect,
// whose whole body it hands to inspect before they are forwarded. Bodies it
// does not inspect (DataRow, CopyData…) pass through in pieces, so a large
// message never needs a large buffer.
type frameScanner struct {
	want [256]bool
	// peek: message types whose arrival matters but whose body does not;
	// inspect gets them with a nil body as soon as the header is read, and
	// the body streams through like any other.
	peek    [256]bool
	maxBody int
	skip    int // bytes of the current uninspected message still to pass through
	inspect func(typ byte, body []byte) error
	// last and prev are the types of the last two messages whose header was
	// seen (0 before any): connection reuse asks what the session ended on.
	last, prev byte
}

// scan looks at buf (bytes read and not yet forwarded) and returns how many
// leading bytes may be forwarded now, and how large the buffer must be to
// make progress when the next message to inspect does not fit (0 if it does).
func (f *frameScanner) scan(buf []byte) (fwd int, need int, err error) {
	i := 0
	for i < len(buf) {
		if f.skip > 0 {
			k := min(f.skip, len(buf)-i)
			i += k
			f.skip -= k
			continue
		}
		if len(buf)-i < 5 {
			break
		}
		typ := buf[i]
		l := int64(int32(binary.BigEndian.Uint32(buf[i+1:])))
		if l < 4 || l-4 > int64(f.maxBody) {
			return i, 0, fmt.Errorf("%w: message %q with length %d", errProtocol, typ, l)
		}
		total := 1 + int(l)
		if !f.want[typ] {
			if f.peek[typ] {
				if err := f.inspect(typ, nil); err != nil {
					return i, 0, err
				}
			}
			f.prev, f.last = f.last, typ
			k := min(total, len(buf)-i)
			i += k
			f.skip = total - k
			continue
		}
		if len(buf)-i < total {
			return i, total, nil
		}
		f.prev, f.last = f.last, typ
		if err := f.inspect(typ, buf[i+5:i+total]); err != nil {
			return i, 0, err
		}
		i += total
	}
	return i, 0, nil
}

// atBoundary reports whether everything forwarded so far ends on a message
// boundary, so that a message of our own may be sent.
func (f *frameScanner) atBoundary() bool { return f.skip == 0 }

// cstring splits a NUL-terminated string off b.
func cstring(b []byte) (string, []byte, bool) {
	for i, c := range b {
		if c == 0 {
			return string(b[:i]), b[i+1:], true
		}
	}
	return "", nil, false
}

// cbytes is cstring without the string allocation.
func cbytes(b []byte) ([]byte, []byte, bool) {
	for i, c := range b {
		if c == 0 {
			return b[:i], b[i+1:], true
		}
	}
	return nil, nil, false
}
