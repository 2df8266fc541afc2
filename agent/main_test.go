package agent

import (
	"fmt"
	"os"
	"testing"

	"go.uber.org/goleak"

	"github.com/pgward/pgward/testenv"
)

func TestMain(m *testing.M) {
	code := m.Run()
	testenv.StopShared() // the end-to-end tests' one Postgres (testenv.SharedPostgres)
	if code == 0 {
		// Sessions must leave nothing running behind them.
		if err := goleak.Find(goleak.IgnoreCurrent(), goleak.IgnoreAnyFunction("github.com/pgward/pgward/broker.(*eventLoop).run")); err != nil {
			fmt.Fprintf(os.Stderr, "goroutines left after the tests:\n%v\n", err)
			code = 1
		}
	}
	os.Exit(code)
}
