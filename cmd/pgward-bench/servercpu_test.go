package main

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgward/pgward/testenv"
)

// The server column's cgroup holds the postmaster and the backends it forks
// afterwards, counts the CPU a query burns in a backend, and is gone, its
// processes back where they were, once closed.
func TestServerCPU(t *testing.T) {
	testenv.RequireRoot(t)
	ctx := context.Background()
	pg, err := testenv.StartPostgres(ctx, testenv.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer pg.Stop()
	s, err := newServerCPU(pg)
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	defer func() {
		if !closed {
			s.close()
		}
	}()
	before, err := s.usage()
	if err != nil {
		t.Fatal(err)
	}
	c, err := pgx.Connect(ctx, pg.DSN(testenv.ScramUser, testenv.ScramPassword, testenv.Database))
	if err != nil {
		t.Fatal(err)
	}
	var pid int
	if err := c.QueryRow(ctx, "select pg_backend_pid()").Scan(&pid); err != nil {
		t.Fatal(err)
	}
	if cg := cgroupOf(t, pid); cg != s.dir {
		t.Errorf("the backend forked after the move is in %s, want %s", cg, s.dir)
	}
	// CPU in the backend (about 0.3 s here), then the backend exits: its
	// CPU stays counted once it is gone.
	if _, err := c.Exec(ctx, "select count(*) from generate_series(1, 3000000)"); err != nil {
		t.Fatal(err)
	}
	c.Close(ctx)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if _, err := os.Stat("/proc/" + strconv.Itoa(pid)); os.IsNotExist(err) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("backend %d still there 10 s after its client left", pid)
		}
	}
	after, err := s.usage()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("server CPU over the query: %v", after-before)
	if after-before < 50*time.Millisecond {
		t.Errorf("server CPU grew by %v over a query that burns about 0.3 s", after-before)
	}
	s.close()
	closed = true
	if _, err := os.Stat(s.dir); !os.IsNotExist(err) {
		t.Errorf("cgroup %s left behind (%v)", s.dir, err)
	}
	if cg := cgroupOf(t, s.pm); cg != s.home {
		t.Errorf("the postmaster is in %s after close, want %s", cg, s.home)
	}
}

// cgroupOf is the cgroup2 directory of pid.
func cgroupOf(t *testing.T, pid int) string {
	t.Helper()
	root, err := testenv.Cgroup2Root()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(l, "0::"); ok {
			return filepath.Join(root, rest)
		}
	}
	t.Fatalf("no cgroup2 line in /proc/%d/cgroup", pid)
	return ""
}
