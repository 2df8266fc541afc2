package exporter

import (
	"encoding/json"
	"strings"
	"testing"
)

func TestAppendJSONString(t *testing.T) {
	tests := []struct {
		in, want string
	}{
		{"", `""`},
		{"plain", `"plain"`},
		{`quote " and \ backslash`, `"quote \" and \\ backslash"`},
		{"nl\ncr\rtab\tbs\bff\f", `"nl\ncr\rtab\tbs\bff\f"`},
		{"\x00\x01\x1f\x7f", `"\u0000\u0001\u001f` + "\x7f" + `"`},
		{"héllo ✓ 😀", `"héllo ✓ 😀"`},
		{"bad \xff byte", `"bad \ufffd byte"`},
		{"truncated \xe2\x9c", `"truncated \ufffd\ufffd"`},
		{"line\u2028sep\u2029", `"line\u2028sep\u2029"`},
		{"</script>", `"</script>"`},
	}
	for _, tt := range tests {
		got := string(appendJSONString(nil, tt.in))
		if got != tt.want {
			t.Errorf("appendJSONString(%q) = %s, want %s", tt.in, got, tt.want)
		}
		if !json.Valid([]byte(got)) {
			t.Errorf("appendJSONString(%q) = %s: not valid JSON", tt.in, got)
		}
	}
}

// validUTF8PerByte replaces each byte of an invalid sequence with U+FFFD, as
// the escaper (and encoding/json) does.
func validUTF8PerByte(s string) string {
	var b strings.Builder
	for _, r := range s {
		b.WriteRune(r)
	}
	return b.String()
}

func FuzzJSONString(f *testing.F) {
	for _, s := range []string{"", "a\"b\\c", "\x00\n\t", "\xff\xfe", "é✓😀", "\u2028", "\xed\xa0\x80"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		prefix := []byte(`{"k":`)
		out := appendJSONString(prefix, s)
		if string(out[:len(prefix)]) != `{"k":` {
			t.Fatalf("prefix clobbered")
		}
		out = append(out, '}')
		var v struct{ K string }
		if err := json.Unmarshal(out, &v); err != nil {
			t.Fatalf("output %q does not parse: %v", out, err)
		}
		if want := validUTF8PerByte(s); v.K != want {
			t.Fatalf("round trip of %q = %q, want %q", s, v.K, want)
		}
		if b := appendJSONBytes(nil, []byte(s)); string(b) != string(out[len(prefix):len(out)-1]) {
			t.Fatalf("appendJSONBytes differs from appendJSONString for %q", s)
		}
	})
}
