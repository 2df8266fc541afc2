package agent

import (
	"fmt"
	"strconv"
	"strings"
	"testing"
)

// FuzzStatStartTime: /proc/<pid>/stat as the kernel writes it, with any
// comm (spaces, parentheses, newlines) and any other fields, gives back the
// start time; arbitrary bytes never panic.
func FuzzStatStartTime(f *testing.F) {
	f.Add([]byte("psql"), uint64(123456), []byte("1234 (psql) S 1 1234 1234 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 98765 0 0\n"))
	f.Add([]byte("a) b (c"), uint64(1), []byte("1 (x) R"))
	f.Add([]byte(") 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9"), uint64(1<<63), []byte(")"))
	f.Add([]byte("tab\there\nnl"), uint64(0), []byte("9 (a) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 18446744073709551616"))
	f.Fuzz(func(t *testing.T, comm []byte, start uint64, raw []byte) {
		_, _ = StatStartTime(raw)
		if len(comm) > 64 || strings.ContainsRune(string(comm), 0) {
			return
		}
		// Fields 3..21, then starttime (22), then more.
		fields := []string{"S", "1", "2", "3", "0", "-1", "4194560", "100", "0", "0", "0", "0", "0", "0", "0", "20", "0", "1", "0"}
		line := fmt.Sprintf("4242 (%s) %s %d 12345 67890\n", comm, strings.Join(fields, " "), start)
		got, ok := StatStartTime([]byte(line))
		if !ok || got != start {
			t.Fatalf("comm %q start %d: got %d %v from %q", comm, start, got, ok, line)
		}
		// A truncated line (fields cut before starttime) is refused.
		cut := fmt.Sprintf("4242 (%s) %s", comm, strings.Join(fields[:18], " "))
		if v, ok := StatStartTime([]byte(cut)); ok {
			t.Fatalf("truncated stat %q parsed as %d", cut, v)
		}
		_ = strconv.Itoa
	})
}
