package testenv

import (
	"os"
	"syscall"
	"testing"
)

// RaiseNoFile raises RLIMIT_NOFILE to n for the test (root may raise the
// hard limit too), and skips (fails under CI) when the hard limit is lower.
func RaiseNoFile(t testing.TB, n uint64) {
	t.Helper()
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	if lim.Cur >= n {
		return
	}
	old := lim
	if lim.Max < n && os.Geteuid() == 0 {
		lim.Max = n // root may raise the hard limit (up to fs.nr_open)
	}
	lim.Cur = min(n, lim.Max)
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatalf("raise RLIMIT_NOFILE to %d: %v", lim.Cur, err)
	}
	if lim.Cur < n {
		SkipUnlessCI(t, "RLIMIT_NOFILE hard limit %d < %d", lim.Max, n)
	}
	t.Cleanup(func() { _ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &old) })
}
