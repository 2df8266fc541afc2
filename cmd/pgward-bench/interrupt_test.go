package main

import (
	"bufio"
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pgward/pgward/testenv"
)

// A SIGTERM in the middle of a run stops the bench, and what it started
// goes with it: the relays and agents it forked, its temporary directory
// and the server's cgroup.
func TestBenchInterrupted(t *testing.T) {
	if _, err := exec.LookPath("pgbench"); err != nil {
		t.Fatalf("pgbench not found (make test installs postgresql-contrib): %v", err)
	}
	bin := filepath.Join(t.TempDir(), "pgward-bench")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	tmp := t.TempDir()
	// The server's cgroups (as root): one made by this run must be gone.
	root, _ := testenv.Cgroup2Root()
	before := map[string]bool{}
	if root != "" {
		old, _ := filepath.Glob(filepath.Join(root, "pgward-bench-server-*"))
		for _, d := range old {
			before[d] = true
		}
	}
	cmd := exec.Command(bin, "-workloads", "simple", "-rounds", "2", "-duration", "3s", "-sweep", "",
		"-decompose=false", "-scale", "1", "-shared-buffers", "64MB")
	cmd.Env = append(os.Environ(), "TMPDIR="+tmp)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	cmd.Stdout = &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill() }()
	// Lines are read on their own goroutine: a regression that orphans the
	// children would keep the pipe open after the bench is gone.
	lines := make(chan string, 64)
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	var log strings.Builder
	signalled := false
	for deadline := time.After(3 * time.Minute); !signalled; {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("the bench ended before a round finished:\n%s", log.String())
			}
			log.WriteString(l + "\n")
			// The first row is done: the relays, the agents and PgBouncer
			// (if installed) run, and the second row's pgbench has started.
			if strings.HasPrefix(l, "round 1/2") {
				if kids := testenv.ChildrenOf(cmd.Process.Pid); len(kids) < 3 {
					t.Errorf("the bench runs %d children, want the relays and the agents", len(kids))
				}
				if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
					t.Fatal(err)
				}
				signalled = true
			}
		case <-deadline:
			t.Fatalf("no round finished in 3 minutes:\n%s", log.String())
		}
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err = <-done:
	case <-time.After(60 * time.Second):
		t.Fatalf("the bench did not exit within 60 s of SIGTERM:\n%s", log.String())
	}
	for l := range lines {
		log.WriteString(l + "\n")
	}
	if err == nil || !strings.Contains(log.String(), "interrupted") {
		t.Errorf("exit %v, want a failure that says it was interrupted:\n%s", err, log.String())
	}
	if left, _ := filepath.Glob(filepath.Join(tmp, "*")); len(left) > 0 {
		t.Errorf("left in TMPDIR: %v", left)
	}
	// Its children (they have the bench's temporary directory in their
	// arguments) are gone, not orphaned.
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		if b, err := os.ReadFile(p); err == nil && bytes.Contains(b, []byte(tmp)) {
			t.Errorf("still running after the bench exited: %s", bytes.ReplaceAll(b, []byte{0}, []byte{' '}))
			if pid, err := strconv.Atoi(filepath.Base(filepath.Dir(p))); err == nil {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}
	if root != "" {
		now, _ := filepath.Glob(filepath.Join(root, "pgward-bench-server-*"))
		for _, d := range now {
			if !before[d] {
				t.Errorf("server cgroup left: %s", d)
			}
		}
	}
}
