package testenv

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"
)

// StartTimeout bounds how long Require waits for a server (the first start
// on a machine also builds the template cluster).
const StartTimeout = 2 * time.Minute

// Require starts a Postgres for this test and stops it in tb.Cleanup. With
// no server binaries installed it skips, naming InstallCommand, except when
// CI=true, where it fails: CI must never silently skip the real server.
// Only the first opts is used; a nil Logf becomes tb.Logf.
func Require(tb testing.TB, opts ...Options) *Postgres {
	tb.Helper()
	var o Options
	if len(opts) > 0 {
		o = opts[0]
	}
	if o.Logf == nil {
		o.Logf = tb.Logf
	}
	if _, err := FindBinDir(); err != nil {
		msg := err.Error()
		if !strings.Contains(msg, InstallCommand) {
			msg += " (install with `" + InstallCommand + "`)"
		}
		if !errors.Is(err, ErrNoPostgres) {
			tb.Fatalf("testenv: %s", msg)
		}
		SkipUnlessCI(tb, "testenv: %s", msg)
	}
	ctx, cancel := context.WithTimeout(context.Background(), StartTimeout)
	defer cancel()
	p, err := StartPostgres(ctx, o)
	if err != nil {
		tb.Fatalf("testenv: start postgres: %v", err)
	}
	tb.Cleanup(func() {
		if err := p.Stop(); err != nil {
			tb.Errorf("testenv: stop postgres: %v", err)
		}
	})
	return p
}
