package broker

import "testing"

// firstLine is what `pgward sessions` shows of a statement: the first
// non-blank line, cut on a rune boundary, marked when anything is left out.
func TestSessionsFirstLine(t *testing.T) {
	for _, tc := range []struct {
		in   string
		max  int
		want string
	}{
		{"select 1", 120, "select 1"},
		{"\n\t  select *\n  from t\n", 120, "select *…"},
		{"select 'ééé'", 10, "select 'é…"},
		{"   ", 120, ""},
		{"abc\r\ndef", 120, "abc…"},
	} {
		if got := firstLine(tc.in, tc.max); got != tc.want {
			t.Errorf("firstLine(%q, %d) = %q, want %q", tc.in, tc.max, got, tc.want)
		}
	}
}
