package testenv

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"os"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// What the end-to-end tests of several packages (agent, broker) share:
// one Postgres per test binary, a log buffer, and a few client helpers.

var (
	sharedMu sync.Mutex
	shared   *Postgres
)

// SharedPostgres returns one Postgres for all of a test binary's tests
// that can share it, started on first use (as Require starts one, with
// its skip or CI failure when no server is installed). The binary's
// TestMain stops it with StopShared after m.Run.
func SharedPostgres(tb testing.TB) *Postgres {
	tb.Helper()
	sharedMu.Lock()
	defer sharedMu.Unlock()
	if shared != nil {
		return shared
	}
	if _, err := FindBinDir(); err != nil {
		Require(tb) // skips, or fails under CI, with the install command
	}
	ctx, cancel := context.WithTimeout(context.Background(), StartTimeout)
	defer cancel()
	pg, err := StartPostgres(ctx, Options{Logf: tb.Logf})
	if err != nil {
		tb.Fatalf("start postgres: %v", err)
	}
	shared = pg
	return pg
}

// StopShared stops the server SharedPostgres started, if any.
func StopShared() {
	sharedMu.Lock()
	defer sharedMu.Unlock()
	if shared != nil {
		_ = shared.Stop()
		shared = nil
	}
}

// SyncBuffer is a bytes.Buffer that goroutines may write at once: a
// logger's or a child process's output, read by the test.
type SyncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *SyncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

// String returns what was written so far.
func (s *SyncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// Reset drops what was written so far.
func (s *SyncBuffer) Reset() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.b = bytes.Buffer{}
}

// PgCode is the SQLSTATE of err, "" when it is no ErrorResponse.
func PgCode(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr.Code
	}
	return ""
}

// BackendPID is the pid of the server backend c's session runs on.
func BackendPID(tb testing.TB, c *pgx.Conn) uint32 {
	tb.Helper()
	var pid uint32
	if err := c.QueryRow(context.Background(), "select pg_backend_pid()", pgx.QueryExecModeSimpleProtocol).Scan(&pid); err != nil {
		tb.Fatal(err)
	}
	return pid
}

// FileLines returns every line of the files, in order (an audit trail's
// files, oldest first), failing the test when one cannot be read.
func FileLines(tb testing.TB, paths ...string) []string {
	tb.Helper()
	var out []string
	for _, p := range paths {
		f, err := os.Open(p)
		if err != nil {
			tb.Fatal(err)
		}
		sc := bufio.NewScanner(f)
		sc.Buffer(nil, 16<<20)
		for sc.Scan() {
			out = append(out, sc.Text())
		}
		err = sc.Err()
		f.Close()
		if err != nil {
			tb.Fatalf("read %s: %v", p, err)
		}
	}
	return out
}
