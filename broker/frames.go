package broker

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// frameScanner walks the protocol messages of one relay direction. It reads
// only frame headers, except for the message types it is told to inspect,
// whose whole message it hands to inspect before it is forwarded. Messages
// it does not inspect (DataRow, CopyData…) pass through in pieces, so they
// never need a buffer of their size, whatever length they announce (up to
// the protocol's 2^31-1).
//
// A message to inspect is capped at maxMsg bytes on the wire (type byte,
// length and body: limits.max_message_bytes); a header announcing more is a
// *MessageTooLargeError before any of its body is buffered.
type frameScanner struct {
	want [256]bool
	// peek: message types whose arrival matters but whose body does not;
	// inspect gets them with a nil body as soon as the header is read, and
	// the body streams through like any other.
	peek    [256]bool
	maxMsg  int
	skip    int // bytes of the current uninspected message still to pass through
	inspect func(typ byte, body []byte) error
	// last and prev are the types of the last two messages whose header was
	// seen (0 before any): connection reuse asks what the session ended on.
	last, prev byte
}

// MessageTooLargeError is a message to inspect whose announced size is over
// limits.max_message_bytes. Size counts the whole message on the wire.
type MessageTooLargeError struct {
	Type  byte
	Size  int64
	Limit int
}

func (e *MessageTooLargeError) Error() string {
	return fmt.Sprintf("message %q of %d bytes is over limits.max_message_bytes (%d)", e.Type, e.Size, e.Limit)
}

// asTooLarge returns err as a *MessageTooLargeError, or nil. It costs
// nothing when err is nil (the relay calls it after every scan; errors.As
// would cost an allocation).
func asTooLarge(err error) *MessageTooLargeError {
	if err == nil {
		return nil
	}
	var tl *MessageTooLargeError
	if errors.As(err, &tl) {
		return tl
	}
	return nil
}

// scan looks at buf (bytes read and not yet forwarded) and returns how many
// leading bytes may be forwarded now, and — when buf ends inside a message
// to inspect — that message's size on the wire (0 otherwise). That message
// then starts at buf[fwd]; need is never more than maxMsg.
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
		// The length counts itself, not the type byte; as an int32 it is
		// at most 2^31-1, and anything under 4 (negative included) is malformed.
		l := int64(int32(binary.BigEndian.Uint32(buf[i+1:])))
		if l < 4 {
			return i, 0, fmt.Errorf("%w: message %q with length %d", errProtocol, typ, l)
		}
		total := 1 + l
		if !f.want[typ] {
			if f.peek[typ] {
				if err := f.inspect(typ, nil); err != nil {
					return i, 0, err
				}
			}
			f.prev, f.last = f.last, typ
			k := int(min(total, int64(len(buf)-i)))
			i += k
			f.skip = int(total) - k
			continue
		}
		if total > int64(f.maxMsg) {
			return i, 0, &MessageTooLargeError{Type: typ, Size: total, Limit: f.maxMsg}
		}
		if int64(len(buf)-i) < total {
			return i, int(total), nil
		}
		f.prev, f.last = f.last, typ
		if err := f.inspect(typ, buf[i+5:i+int(total)]); err != nil {
			return i, 0, err
		}
		i += int(total)
	}
	return i, 0, nil
}

// frameSize is the size on the wire of the whole message that starts buf
// (the scanner has checked its header and that it is all there).
func frameSize(buf []byte) int {
	return 1 + int(binary.BigEndian.Uint32(buf[1:]))
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
