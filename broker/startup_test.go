package broker

import (
	"bytes"
	"encoding/binary"
	"errors"
	"reflect"
	"testing"
)

func startupBody(version uint32, kv ...string) []byte {
	b := binary.BigEndian.AppendUint32(nil, version)
	for _, s := range kv {
		b = append(b, s...)
		b = append(b, 0)
	}
	return append(b, 0)
}

func TestParseStartupPacket(t *testing.T) {
	p, err := parseStartupPacket(startupBody(3<<16, "user", "alice", "database", "orders", "_pq_.foo", "1"))
	if err != nil {
		t.Fatal(err)
	}
	if p.kind != packetStartup || p.minor != 0 || p.params["user"] != "alice" || p.params["database"] != "orders" ||
		!reflect.DeepEqual(p.unsupportedOptions, []string{"_pq_.foo"}) {
		t.Fatalf("got %+v", p)
	}
	p, err = parseStartupPacket(startupBody(3<<16|2, "user", "a"))
	if err != nil || p.minor != 2 {
		t.Fatalf("3.2: %+v %v", p, err)
	}
	bad := map[string][]byte{
		"short":            {0, 3},
		"v2":               startupBody(2<<16, "user", "a"),
		"no user":          startupBody(3<<16, "database", "x"),
		"dup":              startupBody(3<<16, "user", "a", "user", "b"),
		"unterminated":     binary.BigEndian.AppendUint32(nil, 3<<16),
		"trailing":         append(startupBody(3<<16, "user", "a"), 'x'),
		"ssl with body":    binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(nil, codeSSLRequest), 1),
		"cancel too short": binary.BigEndian.AppendUint32(nil, codeCancelRequest),
	}
	for name, b := range bad {
		if _, err := parseStartupPacket(b); !errors.Is(err, errProtocol) {
			t.Errorf("%s: err = %v, want protocol violation", name, err)
		}
	}
}

func TestReadStartupPacketLengths(t *testing.T) {
	for _, n := range []int32{0, 3, 7, -1, MaxStartupPacket + 1, 0x7fffffff} {
		var b bytes.Buffer
		_ = binary.Write(&b, binary.BigEndian, n)
		b.Write(make([]byte, 16))
		if _, err := readStartupPacket(&b); !errors.Is(err, errProtocol) {
			t.Errorf("length %d: err = %v", n, err)
		}
	}
}

func TestParseOptions(t *testing.T) {
	got, order, err := parseOptions(`-c search_path=a,b --statement-timeout=5s -cpgward.principal=billing -c x=a\ b`)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"search_path": "a,b", "statement_timeout": "5s", "pgward.principal": "billing", "x": "a b"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %v", got)
	}
	again, _, err := parseOptions(formatOptions(got, order))
	if err != nil || !reflect.DeepEqual(again, want) {
		t.Fatalf("round trip: %v %v", again, err)
	}
	for _, bad := range []string{"-c", "-B 100", "-c novalue"} {
		if _, _, err := parseOptions(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func FuzzStartupPacket(f *testing.F) {
	f.Add(startupBody(3<<16, "user", "alice", "database", "orders", "options", "-c pgward.principal=x"))
	f.Add(binary.BigEndian.AppendUint32(nil, codeSSLRequest))
	f.Add(binary.BigEndian.AppendUint32(nil, codeGSSENCRequest))
	f.Add(append(binary.BigEndian.AppendUint32(nil, codeCancelRequest), 0, 0, 0, 1, 1, 2, 3, 4))
	f.Add([]byte{0, 3, 0, 2, 'u', 0})
	f.Fuzz(func(t *testing.T, body []byte) {
		var pkt bytes.Buffer
		_ = binary.Write(&pkt, binary.BigEndian, int32(len(body)+4))
		pkt.Write(body)
		p, err := readStartupPacket(&pkt)
		if err != nil {
			return
		}
		if p.kind == packetStartup {
			if p.params["user"] == "" {
				t.Fatal("accepted a startup packet without user")
			}
			if opts, ok := p.params["options"]; ok {
				if s, order, err := parseOptions(opts); err == nil {
					if again, _, err := parseOptions(formatOptions(s, order)); err != nil || !reflect.DeepEqual(again, s) {
						t.Fatalf("options round trip: %q → %v → %v (%v)", opts, s, again, err)
					}
				}
			}
		}
	})
}
