package testenv

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Cgroup is a cgroup v2 directory made for one test by NewCgroup or Child,
// and removed when the test ends. The zero Cgroup stands for "no cgroup of
// its own": Start then starts a command where this process is.
type Cgroup struct {
	Path string
	ID   uint64 // the directory's inode: the cgroup v2 id
}

// NewCgroup creates a temporary cgroup, pgward-test-XXXX, under parent (""
// means the cgroup2 root) and removes it when the test ends, after the
// processes in it have left (exited ones leave asynchronously). Without a
// cgroup2 file system it skips, or fails under CI=true. Creating cgroups
// needs root: pair it with RequireRoot.
func NewCgroup(tb testing.TB, parent string) Cgroup {
	tb.Helper()
	if parent == "" {
		root, err := Cgroup2Root()
		if err != nil {
			SkipUnlessCI(tb, "no cgroup2: %v", err)
		}
		parent = root
	}
	dir, err := os.MkdirTemp(parent, "pgward-test-")
	if err != nil {
		tb.Fatalf("create cgroup: %v", err)
	}
	return openCgroup(tb, dir)
}

// Child creates the cgroup cg/name, for a test that needs a given name (a
// container's, say), and removes it when the test ends, before cg.
func (cg Cgroup) Child(tb testing.TB, name string) Cgroup {
	tb.Helper()
	dir := filepath.Join(cg.Path, name)
	if err := os.Mkdir(dir, 0o755); err != nil {
		tb.Fatalf("create cgroup: %v", err)
	}
	return openCgroup(tb, dir)
}

// openCgroup removes the new cgroup dir at the end of the test and returns
// it with its id.
func openCgroup(tb testing.TB, dir string) Cgroup {
	tb.Helper()
	tb.Cleanup(func() {
		for i := 0; ; i++ {
			err := unix.Rmdir(dir)
			if err == nil || errors.Is(err, unix.ENOENT) {
				return
			}
			if i == 50 {
				tb.Errorf("remove cgroup %s: %v", dir, err)
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		tb.Fatalf("stat cgroup: %v", err)
	}
	return Cgroup{Path: dir, ID: st.Ino}
}

// Start starts cmd inside cg (clone3 with CLONE_INTO_CGROUP), so the process
// is in cg from its first instruction, never briefly outside it. It keeps
// cmd's other SysProcAttr settings. For the zero Cgroup it is cmd.Start.
func (cg Cgroup) Start(cmd *exec.Cmd) error {
	if cg.Path == "" {
		return cmd.Start()
	}
	dir, err := os.Open(cg.Path)
	if err != nil {
		return fmt.Errorf("open cgroup: %w", err)
	}
	defer dir.Close()
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.UseCgroupFD, cmd.SysProcAttr.CgroupFD = true, int(dir.Fd())
	return cmd.Start()
}

// Enter moves this whole test process into cg, and back to the cgroup it
// was in when the test ends.
func (cg Cgroup) Enter(tb testing.TB) {
	tb.Helper()
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		tb.Fatal(err)
	}
	var orig string
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "0::"); ok {
			orig = rest
		}
	}
	root, err := Cgroup2Root()
	if err != nil {
		tb.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(cg.Path, "cgroup.procs"), []byte(strconv.Itoa(os.Getpid())), 0); err != nil {
		tb.Fatalf("enter cgroup: %v", err)
	}
	tb.Cleanup(func() {
		back := filepath.Join(root, orig, "cgroup.procs")
		if err := os.WriteFile(back, []byte(strconv.Itoa(os.Getpid())), 0); err != nil {
			tb.Errorf("leave cgroup: %v", err)
		}
	})
}

// Cgroup2Root returns the cgroup v2 mount point: /sys/fs/cgroup/unified on
// hybrid v1/v2 hosts, /sys/fs/cgroup on unified ones, else the first cgroup2
// mount in /proc/self/mountinfo. (bpf.Cgroup2Root is the product's own; the
// bpf package's tests import testenv, so testenv cannot import bpf.)
func Cgroup2Root() (string, error) {
	for _, p := range []string{"/sys/fs/cgroup/unified", "/sys/fs/cgroup"} {
		var st unix.Statfs_t
		if unix.Statfs(p, &st) == nil && st.Type == unix.CGROUP2_SUPER_MAGIC {
			return p, nil
		}
	}
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return "", fmt.Errorf("find cgroup2 mount: %w", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		// 36 35 0:30 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw
		pre, post, ok := strings.Cut(line, " - ")
		if f := strings.Fields(pre); ok && len(f) >= 5 && strings.HasPrefix(post, "cgroup2 ") {
			return f[4], nil
		}
	}
	return "", errors.New("no cgroup2 file system mounted")
}
