package testenv

import (
	"fmt"
	"os"
	"testing"
)

// InCI reports whether the tests run in CI: CI=true, which .ci/run sets.
func InCI() bool { return os.Getenv("CI") == "true" }

// SkipUnlessCI skips the test with the reason, as tb.Skipf does, except
// under CI=true, where it fails with the reason instead: CI must run every
// test, and a test that cannot run there is a broken CI machine, not a pass.
// Use it for skips that depend on the machine (a missing tool, no root, no
// cgroup2), not for the hooks of re-executed child processes.
func SkipUnlessCI(tb testing.TB, format string, args ...any) {
	tb.Helper()
	reason := fmt.Sprintf(format, args...)
	if InCI() {
		tb.Fatalf("CI=true: %s (CI must run every test, so this one may not skip)", reason)
	}
	tb.Skipf("%s", reason)
}
