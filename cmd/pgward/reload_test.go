package main

import (
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// SIGHUP reloads a running `pgward agent`: the real verb, in this process,
// with real signals. Under -race this is the test of the reload path of
// the binary: the SIGHUP callback runs on the signal goroutine and must
// see the agent main built without a data race.
func TestAgentReloadsOnSIGHUP(t *testing.T) {
	dir, err := os.MkdirTemp("", "pgwr-") // short: the socket path has 107 bytes
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	cfg := func(roles string) string {
		return fmt.Sprintf(`listen: { unix_dir: %s }
upstreams:
  orders: { address: /nonexistent/.s.PGSQL.5432 }
secrets: { backend: env }
principals: { p: { match: { uid: [%d] } } }
grants: [ { principal: p, upstream: orders, roles: [%s] } ]
audit: { path: %s/audit.jsonl }
ebpf: { enabled: false }
`, dir, os.Getuid(), roles, dir)
	}
	cfgPath := filepath.Join(dir, "pgward.yaml")
	if err := os.WriteFile(cfgPath, []byte(cfg("r")), 0o644); err != nil {
		t.Fatal(err)
	}

	// While the verb runs it handles SIGHUP and SIGTERM itself; this
	// channel keeps a signal that arrives outside that time (before it
	// registers, after it stops) from killing the test binary.
	guard := make(chan os.Signal, 16)
	signal.Notify(guard, syscall.SIGHUP, syscall.SIGTERM)
	defer signal.Stop(guard)

	var stdout, stderr lockedBuffer
	exited := make(chan int, 1)
	go func() { exited <- run([]string{"agent", "--config", cfgPath}, &stdout, &stderr) }()

	sock := filepath.Join(dir, ".s.PGSQL.5432")
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := net.Dial("unix", sock)
		if err == nil {
			c.Close()
			break
		}
		select {
		case code := <-exited:
			t.Fatalf("agent exited %d before listening:\n%s", code, stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("agent not listening after 30s:\n%s", stderr.String())
		}
		time.Sleep(10 * time.Millisecond)
	}

	// A good file is applied, a bad one refused with the old kept.
	waitLog := func(want string, n int) {
		t.Helper()
		for time.Now().Before(deadline) {
			if strings.Count(stderr.String(), want) >= n {
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
		t.Fatalf("no %q (×%d) after SIGHUP:\n%s", want, n, stderr.String())
	}
	os.WriteFile(cfgPath, []byte(cfg("r, r2")), 0o644)
	syscall.Kill(os.Getpid(), syscall.SIGHUP)
	waitLog("configuration reloaded", 1)
	os.WriteFile(cfgPath, []byte(cfg("r")+"bogus: 1\n"), 0o644)
	syscall.Kill(os.Getpid(), syscall.SIGHUP)
	waitLog("reload refused", 1)

	syscall.Kill(os.Getpid(), syscall.SIGTERM)
	select {
	case code := <-exited:
		if code != exitOK {
			t.Fatalf("exit %d after SIGTERM:\n%s", code, stderr.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("agent still running 30s after SIGTERM:\n%s", stderr.String())
	}
}
