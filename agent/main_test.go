package agent

import (
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/pgward/pgward/testenv"
)

// sharedPG is one real Postgres for the package's end-to-end tests.
var sharedPG *testenv.Postgres

func TestMain(m *testing.M) {
	code := m.Run()
	if sharedPG != nil {
		_ = sharedPG.Stop()
	}
	if code == 0 {
		// Sessions must leave nothing running behind them.
		if err := goleak.Find(goleak.IgnoreCurrent()); err != nil {
			fmt.Fprintf(os.Stderr, "goroutines left after the tests:\n%v\n", err)
			code = 1
		}
	}
	os.Exit(code)
}

// postgres returns the shared server, starting it on first use.
func postgres(t *testing.T) *testenv.Postgres {
	t.Helper()
	if sharedPG != nil {
		return sharedPG
	}
	if _, err := testenv.FindBinDir(); err != nil {
		testenv.Require(t) // skips, or fails under CI, with the install command
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	pg, err := testenv.StartPostgres(ctx, testenv.Options{Logf: t.Logf})
	if err != nil {
		t.Fatalf("start postgres: %v", err)
	}
	sharedPG = pg
	return pg
}
