package testenv_test

import (
	"bytes"
	"encoding/hex"
	"errors"
	"io"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pgward/pgward/testenv"
)

func TestSkipUnlessCI(t *testing.T) {
	for _, ci := range []string{"", "false", "true"} {
		t.Setenv("CI", ci)
		r := &recordTB{TB: t}
		done := make(chan struct{})
		go func() {
			defer close(done)
			testenv.SkipUnlessCI(r, "no %s here", "widget")
		}()
		<-done
		if ci == "true" {
			if !strings.HasPrefix(r.failed, "CI=true: no widget here") || r.skipped != "" {
				t.Errorf("CI=true: skipped=%q failed=%q, want a failure with the reason", r.skipped, r.failed)
			}
		} else if r.skipped != "no widget here" || r.failed != "" {
			t.Errorf("CI=%q: skipped=%q failed=%q, want a skip with the reason", ci, r.skipped, r.failed)
		}
	}
}

func TestCgroup(t *testing.T) {
	testenv.RequireRoot(t)
	var parent, cg testenv.Cgroup
	t.Run("use", func(t *testing.T) {
		parent = testenv.NewCgroup(t, "")
		cg = parent.Child(t, "named.scope")
		if filepath.Dir(cg.Path) != parent.Path || filepath.Base(cg.Path) != "named.scope" ||
			cg.ID == 0 || cg.ID == parent.ID {
			t.Fatalf("parent %+v, child %+v", parent, cg)
		}
		want := "/" + filepath.Base(parent.Path) + "/named.scope"

		cmd := exec.Command("cat", "/proc/self/cgroup")
		var out bytes.Buffer
		cmd.Stdout = &out
		if err := cg.Start(cmd); err != nil {
			t.Fatal(err)
		}
		if err := cmd.Wait(); err != nil || !strings.HasSuffix(strings.TrimSpace(out.String()), want) {
			t.Errorf("started in %q (%v), want …%s", out.String(), err, want)
		}

		cg.Enter(t)
		b, err := os.ReadFile("/proc/self/cgroup")
		if err != nil || !strings.HasSuffix(strings.TrimSpace(string(b)), want) {
			t.Errorf("entered %q (%v), want …%s", b, err, want)
		}
	})
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil || strings.Contains(string(b), "named.scope") {
		t.Errorf("still in %q (%v) after the test", b, err)
	}
	for _, d := range []string{cg.Path, parent.Path} {
		if _, err := os.Stat(d); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("cgroup %s left behind: %v", d, err)
		}
	}
}

func TestSendCancel(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	got := make(chan []byte, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- nil
			return
		}
		b := make([]byte, 16)
		_, _ = io.ReadFull(c, b)
		c.Close() // as a server does: no answer
		got <- b
	}()
	if err := testenv.SendCancel("unix", path, 0x01020304, 0xa0b0c0d0); err != nil {
		t.Fatal(err)
	}
	// length 16, code 80877102, pid, key
	if b, want := <-got, "0000001004d2162e01020304a0b0c0d0"; hex.EncodeToString(b) != want {
		t.Errorf("sent %x, want %s", b, want)
	}
	if err := testenv.SendCancel("unix", path+"-missing", 1, 2); err == nil {
		t.Error("SendCancel to nothing returned no error")
	}
}
