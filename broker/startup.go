package broker

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strings"
)

// Startup packet codes (the "protocol version" field).
const (
	codeSSLRequest    = 80877103
	codeGSSENCRequest = 80877104
	codeCancelRequest = 80877102
	protocolMajor3    = 3
)

// MaxStartupPacket is Postgres's MAX_STARTUP_PACKET_LENGTH.
const MaxStartupPacket = 10000

// packetKind is what a startup-phase packet is.
type packetKind int

const (
	packetStartup packetKind = iota + 1
	packetSSL
	packetGSSENC
	packetCancel
)

// startupPacket is one decoded startup-phase packet.
type startupPacket struct {
	kind packetKind
	// packetStartup
	minor  uint16            // requested protocol minor version (3.minor)
	params map[string]string // in order of arrival is not kept; keys are unique
	// protocol options (_pq_.*) the client asked for; we support none
	unsupportedOptions []string
	// packetCancel
	cancelPID uint32
	cancelKey []byte
}

// errProtocol marks a malformed startup packet (SQLSTATE 08P01).
var errProtocol = errors.New("protocol violation")

// readStartupPacket reads one length-prefixed startup-phase packet from r.
// It never allocates more than MaxStartupPacket bytes whatever the length
// field says.
func readStartupPacket(r io.Reader) (*startupPacket, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, err
	}
	n := int64(int32(binary.BigEndian.Uint32(hdr[:])))
	if n < 8 || n > MaxStartupPacket {
		return nil, fmt.Errorf("%w: startup packet length %d is outside 8..%d", errProtocol, n, MaxStartupPacket)
	}
	body := make([]byte, n-4)
	if _, err := io.ReadFull(r, body); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	return parseStartupPacket(body)
}

// parseStartupPacket decodes the body of a startup-phase packet (everything
// after the length). It is pure and fuzzed.
func parseStartupPacket(body []byte) (*startupPacket, error) {
	if len(body) < 4 {
		return nil, fmt.Errorf("%w: startup packet too short", errProtocol)
	}
	code := binary.BigEndian.Uint32(body)
	rest := body[4:]
	switch code {
	case codeSSLRequest, codeGSSENCRequest:
		if len(rest) != 0 {
			return nil, fmt.Errorf("%w: encryption request with a body", errProtocol)
		}
		if code == codeSSLRequest {
			return &startupPacket{kind: packetSSL}, nil
		}
		return &startupPacket{kind: packetGSSENC}, nil
	case codeCancelRequest:
		// 3.0 keys are 4 bytes; 3.2 allows up to 256.
		if len(rest) < 8 || len(rest) > 4+256 {
			return nil, fmt.Errorf("%w: cancel request of %d bytes", errProtocol, len(body))
		}
		return &startupPacket{
			kind:      packetCancel,
			cancelPID: binary.BigEndian.Uint32(rest),
			cancelKey: bytes.Clone(rest[4:]),
		}, nil
	}
	major, minor := code>>16, uint16(code&0xffff)
	if major != protocolMajor3 {
		return nil, fmt.Errorf("%w: unsupported frontend protocol %d.%d: pgward speaks 3.0", errProtocol, major, minor)
	}
	p := &startupPacket{kind: packetStartup, minor: minor, params: map[string]string{}}
	for {
		if len(rest) == 0 {
			return nil, fmt.Errorf("%w: startup packet not terminated", errProtocol)
		}
		if rest[0] == 0 {
			if len(rest) != 1 {
				return nil, fmt.Errorf("%w: bytes after the startup packet's terminator", errProtocol)
			}
			break
		}
		i := bytes.IndexByte(rest, 0)
		if i < 0 {
			return nil, fmt.Errorf("%w: startup parameter name not terminated", errProtocol)
		}
		key := string(rest[:i])
		rest = rest[i+1:]
		j := bytes.IndexByte(rest, 0)
		if j < 0 {
			return nil, fmt.Errorf("%w: startup parameter %q value not terminated", errProtocol, key)
		}
		val := string(rest[:j])
		rest = rest[j+1:]
		if strings.HasPrefix(key, "_pq_.") {
			p.unsupportedOptions = append(p.unsupportedOptions, key)
			continue
		}
		if _, dup := p.params[key]; dup {
			return nil, fmt.Errorf("%w: startup parameter %q given twice", errProtocol, key)
		}
		p.params[key] = val
	}
	if p.params["user"] == "" {
		return nil, fmt.Errorf("%w: no PostgreSQL user name specified in startup packet", errProtocol)
	}
	return p, nil
}

// parseOptions splits a startup "options" value into its settings, the way
// the server does (pg_split_opts): whitespace separates, backslash escapes.
// It accepts "-c name=value", "-cname=value" and "--name=value".
func parseOptions(s string) (map[string]string, []string, error) {
	// Byte by byte, splitting on exactly what the server's isspace() does:
	// a character the server splits on and pgward did not would let a value
	// smuggle a setting ("-c x=\f-crole=postgres").
	var words []string
	var cur strings.Builder
	inWord, esc := false, false
	for i := 0; i < len(s); i++ {
		r := s[i]
		switch {
		case esc:
			cur.WriteByte(r)
			esc = false
		case r == '\\':
			esc, inWord = true, true
		case optionSpace(r):
			if inWord {
				words = append(words, cur.String())
				cur.Reset()
				inWord = false
			}
		default:
			cur.WriteByte(r)
			inWord = true
		}
	}
	if inWord {
		words = append(words, cur.String())
	}
	settings := map[string]string{}
	var order []string
	for i := 0; i < len(words); i++ {
		w := words[i]
		var kv string
		switch {
		case w == "-c":
			if i+1 >= len(words) {
				return nil, nil, errors.New(`"-c" without a setting`)
			}
			i++
			kv = words[i]
		case strings.HasPrefix(w, "-c"):
			kv = w[2:]
		case strings.HasPrefix(w, "--"):
			kv = w[2:]
		default:
			return nil, nil, fmt.Errorf("unsupported option %q: only -c name=value settings may be passed", w)
		}
		name, val, ok := strings.Cut(kv, "=")
		if !ok || name == "" {
			return nil, nil, fmt.Errorf("option %q is not name=value", kv)
		}
		name = strings.ToLower(strings.ReplaceAll(name, "-", "_"))
		if _, dup := settings[name]; !dup {
			order = append(order, name)
		}
		settings[name] = val
	}
	return settings, order, nil
}

// formatOptions joins settings back into an options string, escaping as the
// server expects.
func formatOptions(settings map[string]string, order []string) string {
	var b strings.Builder
	for _, name := range order {
		if b.Len() > 0 {
			b.WriteByte(' ')
		}
		b.WriteString("-c ")
		kv := name + "=" + settings[name]
		for i := 0; i < len(kv); i++ {
			if kv[i] == '\\' || optionSpace(kv[i]) {
				b.WriteByte('\\')
			}
			b.WriteByte(kv[i])
		}
	}
	return b.String()
}

// optionSpace is the server's isspace() in the C locale, which
// pg_split_opts splits options on.
func optionSpace(c byte) bool {
	return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'
}
