package broker

import (
	"bytes"
	"encoding/binary"
	"strings"
	"testing"
)

// refSplitOptions is an independent, byte-wise rendering of the server's
// pg_split_opts followed by its -c/-- handling (ParseLongOption: '-' → '_';
// GUC names compare case-insensitively). It returns the setting names the
// server would apply, or ok=false when the server would reject the string.
func refSplitOptions(s string) (names []string, ok bool) {
	var words [][]byte
	var cur []byte
	in, esc := false, false
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case esc:
			cur, esc = append(cur, c), false
		case c == '\\':
			esc, in = true, true
		case c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v':
			if in {
				words, cur, in = append(words, cur), nil, false
			}
		default:
			cur, in = append(cur, c), true
		}
	}
	if in {
		words = append(words, cur)
	}
	for i := 0; i < len(words); i++ {
		w := string(words[i])
		var kv string
		switch {
		case w == "-c":
			if i+1 >= len(words) {
				return nil, false
			}
			i++
			kv = string(words[i])
		case strings.HasPrefix(w, "-c"), strings.HasPrefix(w, "--"):
			kv = w[2:]
		default:
			// Any other switch is one the server also honours (-B, -e…):
			// report it so the property below can see it was not forwarded.
			names = append(names, "switch:"+w)
			continue
		}
		name, _, _ := strings.Cut(kv, "=")
		names = append(names, strings.ToLower(strings.ReplaceAll(name, "-", "_")))
	}
	return names, true
}

// FuzzParseOptions: whatever a client puts in the startup "options", the
// options pgward forwards set nothing forbidden, never carry the principal
// claim, carry no switch other than -c, and survive a round trip; and a
// forbidden setting the server would apply is always refused.
func FuzzParseOptions(f *testing.F) {
	for _, s := range []string{
		"-c search_path=public", "-csearch_path=a\\ b", "--search-path=x", "-c role=postgres",
		"-c ROLE=postgres", "--session-authorization=postgres", "-c session\\_authorization=x",
		"-c pgward.principal=me -c statement_timeout=5s", "-c\trole=x", "-c a=b\\", "-B 100",
		"-c\\ role=x", "-c \\role=x", "--Role=x", "-c a=\\-c\\ role=x", "-c x=\xff\xfe",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, opts string) {
		out, claim, cerr := filterParams(map[string]string{"user": "u", "options": opts})
		refNames, refOK := refSplitOptions(opts)
		if cerr == nil && refOK {
			for _, n := range refNames {
				if forbiddenSettings[n] {
					t.Fatalf("options %q set %q on the server but were accepted", opts, n)
				}
			}
		}
		if cerr != nil {
			return
		}
		fwd, ok := out["options"]
		if !ok {
			return
		}
		names, ok := refSplitOptions(fwd)
		if !ok {
			t.Fatalf("forwarded options %q do not parse", fwd)
		}
		for _, n := range names {
			if forbiddenSettings[n] || n == claimSetting || strings.HasPrefix(n, "switch:") {
				t.Fatalf("options %q forwarded as %q, which sets %q", opts, fwd, n)
			}
		}
		if claim != "" && strings.Contains(fwd, claimSetting+"=") {
			t.Fatalf("claim forwarded: %q", fwd)
		}
		s1, o1, err := parseOptions(fwd)
		if err != nil {
			t.Fatalf("forwarded options %q: %v", fwd, err)
		}
		if fwd2 := formatOptions(s1, o1); fwd2 != fwd {
			t.Fatalf("round trip %q → %q", fwd, fwd2)
		}
	})
}

// FuzzRelayNoSmuggling: through the client→upstream scanner, every forwarded
// message of an audited type was handed to the audit hook exactly once, in
// order, with the very body the server will read; nothing audited is
// forwarded unseen, however the stream is split into reads.
func FuzzRelayNoSmuggling(f *testing.F) {
	q := msg('Q', cstr("select 1"))
	f.Add(append(append([]byte{}, q...), msg('X')...), uint8(3), uint8(0))
	f.Add(append(msg('d', []byte("copy data")), q...), uint8(1), uint8(7))
	// A Query whose declared length swallows a second Query.
	inner := msg('Q', cstr("drop table t"))
	outer := msg('Q', append(cstr("select 1"), inner...))
	f.Add(outer, uint8(2), uint8(1))
	f.Add(append(msg('B', cstr(""), cstr(""), u16(0), u16(1), u32(3), []byte("abc"), u16(0)), msg('E', cstr(""), u32(0))...), uint8(4), uint8(2))
	f.Add([]byte{'Q', 0x80, 0, 0, 5}, uint8(0), uint8(0))
	f.Fuzz(func(t *testing.T, stream []byte, split, maxSel uint8) {
		maxMsg := []int{1 << 16, 64, 8, 1 << 20}[maxSel%4]
		type seen struct {
			typ  byte
			body []byte
		}
		var inspected []seen
		fs := &frameScanner{maxMsg: maxMsg}
		audited := []byte{'Q', 'P', 'B', 'E', 'C', 'F', 'S', 'D', 'X'}
		for _, c := range audited {
			fs.want[c] = true
		}
		fs.inspect = func(typ byte, body []byte) error {
			if 5+len(body) > maxMsg {
				t.Fatalf("inspected a %d-byte message over the %d limit", 5+len(body), maxMsg)
			}
			inspected = append(inspected, seen{typ, bytes.Clone(body)})
			return nil
		}
		out, _ := feed(t, fs, stream, []int{int(split%32) + 1})
		if !bytes.HasPrefix(stream, out) {
			t.Fatal("forwarded bytes are not a prefix of the stream")
		}
		// Walk the forwarded bytes as the server will.
		var want []seen
		b := out
		for len(b) >= 5 {
			l := int64(int32(binary.BigEndian.Uint32(b[1:])))
			if l < 4 || bytes.IndexByte(audited, b[0]) >= 0 && 1+l > int64(maxMsg) {
				t.Fatalf("forwarded a %q frame of declared length %d", b[0], l)
			}
			if int64(len(b)) < 1+l {
				if bytes.IndexByte(audited, b[0]) >= 0 {
					t.Fatalf("forwarded part of an audited %q message", b[0])
				}
				break
			}
			if bytes.IndexByte(audited, b[0]) >= 0 {
				want = append(want, seen{b[0], b[5 : 1+l]})
			}
			b = b[1+l:]
		}
		if len(b) > 0 && len(b) < 5 {
			t.Fatalf("forwarded a partial header %x", b)
		}
		if len(want) != len(inspected) {
			t.Fatalf("server reads %d audited messages, audit saw %d", len(want), len(inspected))
		}
		for i := range want {
			if want[i].typ != inspected[i].typ || !bytes.Equal(want[i].body, inspected[i].body) {
				t.Fatalf("message %d: server reads %q %q, audit saw %q %q", i, want[i].typ, want[i].body, inspected[i].typ, inspected[i].body)
			}
		}
	})
}
