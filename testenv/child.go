package testenv

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// A test that needs a client in a process of its own (another uid, another
// cgroup, another namespace) re-executes its test binary: the child runs
// only a hook test, named with -test.run, that skips unless an environment
// variable the parent sets is there. TestBinary is the binary to run,
// StartChild starts it and waits for the report the hook makes with Report.

// TestBinary returns a copy of the running test binary that any uid may
// execute, named "client" (so a child's comm is "client"): the original lies
// in a build directory only its owner may enter. The copy is made once per
// process, in a new 0755 directory under os.TempDir().
func TestBinary() (string, error) { return testBinary() }

var testBinary = sync.OnceValues(func() (string, error) {
	self, err := os.Executable()
	if err != nil {
		return "", err
	}
	dir, err := os.MkdirTemp("", "pgward-client-")
	if err != nil {
		return "", err
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		return "", err
	}
	b, err := os.ReadFile(self)
	if err != nil {
		return "", err
	}
	path := filepath.Join(dir, "client")
	return path, os.WriteFile(path, b, 0o755)
})

// childMarker starts the stdout line on which a child reports.
const childMarker = "PGWARD-CHILD-RESULT "

// Child is a process started by StartChild. It holds until Close.
type Child struct {
	Cmd   *exec.Cmd
	stdin io.WriteCloser
}

// StartChild starts cmd inside cg (see Cgroup.Start; the zero Cgroup for
// none), waits for the line its hook writes with Report and decodes that
// line's JSON into result. The child then holds until Close, which the end
// of the test also calls. Its stderr is this process's; its stdout after the
// report is discarded.
func StartChild(tb testing.TB, cg Cgroup, cmd *exec.Cmd, result any) *Child {
	tb.Helper()
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		tb.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		tb.Fatal(err)
	}
	if err := cg.Start(cmd); err != nil {
		tb.Fatalf("start child: %v", err)
	}
	c := &Child{Cmd: cmd, stdin: stdin}
	tb.Cleanup(func() { c.Close() })
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), childMarker); ok {
			if err := json.Unmarshal([]byte(rest), result); err != nil {
				tb.Fatalf("child's report: %v", err)
			}
			go io.Copy(io.Discard, stdout)
			return c
		}
	}
	tb.Fatalf("child reported nothing: %v", sc.Err())
	return nil
}

// Close lets the child exit, by closing its stdin, and waits for it.
func (c *Child) Close() error {
	c.stdin.Close()
	return c.Cmd.Wait()
}

// Report is the child's side of StartChild, called by its hook test: it
// writes result, as JSON, on the line StartChild waits for, holds until the
// parent closes stdin, and exits 0. It does not return.
func Report(result any) {
	b, err := json.Marshal(result)
	if err != nil {
		fmt.Fprintln(os.Stderr, "child report:", err)
		os.Exit(2)
	}
	fmt.Printf("%s%s\n", childMarker, b)
	io.Copy(io.Discard, os.Stdin)
	os.Exit(0)
}
