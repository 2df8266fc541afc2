package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/pgward/pgward/testenv"
)

// serverCPU measures the PostgreSQL server's CPU (the postmaster's, its
// helpers' and every backend's) through a cgroup of its own, for the
// `server µs/stmt` column: how much each path makes the server spend per
// statement. At many clients on few CPUs that moves by more than a proxy's
// own cost (docs/performance.md).
type serverCPU struct {
	dir  string // the server's cgroup
	home string // the cgroup its processes go back to when the bench ends
	pm   int    // the postmaster's pid
}

// newServerCPU moves the server's processes into a new cgroup under the
// cgroup2 root; backends forked later follow the postmaster into it. It
// fails, and the column shows "-", where that cannot be done (not root, no
// cgroup2).
func newServerCPU(pg *testenv.Postgres) (*serverCPU, error) {
	root, err := testenv.Cgroup2Root()
	if err != nil {
		return nil, err
	}
	b, err := os.ReadFile(filepath.Join(pg.DataDir, "postmaster.pid"))
	if err != nil {
		return nil, err
	}
	pm, err := strconv.Atoi(strings.TrimSpace(strings.SplitN(string(b), "\n", 2)[0]))
	if err != nil {
		return nil, fmt.Errorf("postmaster.pid: %w", err)
	}
	self, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return nil, err
	}
	home := root
	for _, l := range strings.Split(string(self), "\n") {
		if rest, ok := strings.CutPrefix(l, "0::"); ok {
			home = filepath.Join(root, rest)
		}
	}
	dir, err := os.MkdirTemp(root, "pgward-bench-server-")
	if err != nil {
		return nil, err
	}
	s := &serverCPU{dir: dir, home: home, pm: pm}
	// The postmaster first, so that what it forks meanwhile lands in dir.
	if err := s.move(pm, dir); err != nil {
		s.close()
		return nil, fmt.Errorf("move the postmaster into %s: %w", dir, err)
	}
	for _, pid := range testenv.ChildrenOf(pm) {
		_ = s.move(pid, dir) // one that exited meanwhile does not matter
	}
	if _, err := s.usage(); err != nil {
		s.close()
		return nil, err
	}
	return s, nil
}

func (s *serverCPU) move(pid int, to string) error {
	return os.WriteFile(filepath.Join(to, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0)
}

// usage is the CPU time the server's processes have used so far
// (cpu.stat usage_usec; it keeps what exited processes used).
func (s *serverCPU) usage() (time.Duration, error) {
	b, err := os.ReadFile(filepath.Join(s.dir, "cpu.stat"))
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(l, "usage_usec "); ok {
			v, err := strconv.ParseInt(rest, 10, 64)
			if err != nil {
				return 0, fmt.Errorf("cpu.stat: %w", err)
			}
			return time.Duration(v) * time.Microsecond, nil
		}
	}
	return 0, fmt.Errorf("%s/cpu.stat has no usage_usec", s.dir)
}

// at is usage, 0 when s is nil or cannot be read.
func (s *serverCPU) at() time.Duration {
	if s == nil {
		return 0
	}
	d, _ := s.usage()
	return d
}

// close moves what is left in the cgroup back where the bench runs and
// removes it.
func (s *serverCPU) close() {
	if b, err := os.ReadFile(filepath.Join(s.dir, "cgroup.procs")); err == nil {
		for _, f := range strings.Fields(string(b)) {
			if pid, err := strconv.Atoi(f); err == nil {
				_ = s.move(pid, s.home)
			}
		}
	}
	_ = os.Remove(s.dir)
}
