package main

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pgward/pgward/testenv"
)

// TestMain lets a test run this binary's CLI as another process (and uid),
// the fake upstream of TestIdleSessionsScale, or the login client of
// TestHostileMemoryBounded, or the slot flooder of TestHostileSoak.
func TestMain(m *testing.M) {
	if path := os.Getenv(envIdleUpstream); path != "" {
		os.Exit(serveIdleUpstream(path))
	}
	if spec := os.Getenv(testenv.EnvSlotFlood); spec != "" {
		testenv.SlotFlood(spec) // the other uid's flooder of TestHostileSoak
	}
	if dsn := os.Getenv(envLoginClient); dsn != "" {
		os.Exit(serveLoginClient(dsn))
	}
	if args := os.Getenv("PGWARD_CMD_CHILD"); args != "" {
		if ack := os.Getenv(envGCAck); ack != "" {
			freeOSMemoryOnSIGUSR1(ack)
		}
		os.Exit(run(strings.Fields(args), os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

// Without the privileges for eBPF, `ebpf.enabled: auto` runs on peer
// credentials alone and says so once at WARN, in /readyz and in
// pgward_ebpf_probes_attached; SIGTERM then exits 0.
func TestAgentWithoutEBPFPrivileges(t *testing.T) {
	testenv.RequireRoot(t)
	uid := testenv.UnprivilegedIDs(t, 1)[0]
	dir, err := os.MkdirTemp("", "pgwc-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	os.Chmod(dir, 0o755)
	self, _ := os.Executable()
	bin := filepath.Join(dir, "pgward.test")
	b, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, b, 0o755); err != nil {
		t.Fatal(err)
	}
	run := filepath.Join(dir, "run")
	os.Mkdir(run, 0o755)
	os.Chown(run, int(uid), int(uid))
	port := freePort(t)
	cfg := fmt.Sprintf(`listen: { unix_dir: %s }
upstreams:
  orders: { address: /nonexistent/.s.PGSQL.5432 }
secrets: { backend: env }
principals: { p: { match: { uid: [%d] } } }
grants: [ { principal: p, upstream: orders, roles: [r] } ]
audit: { path: %s/audit.jsonl }
metrics: { listen: "127.0.0.1:%d" }
ebpf: { enabled: auto }
`, run, uid, run, port)
	cfgPath := filepath.Join(dir, "pgward.yaml")
	os.WriteFile(cfgPath, []byte(cfg), 0o644)

	cmd := testenv.RunAs(uid, uid, bin)
	cmd.Env = append(cmd.Env, "PGWARD_CMD_CHILD=agent --config "+cfgPath, "PGWARD_LOG_FORMAT=json")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
		}
	}()

	var ready string
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/readyz", port))
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == 200 {
				ready = string(body)
				break
			}
		}
		select {
		case err := <-exited:
			t.Fatalf("agent exited: %v\n%s", err, stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("agent never ready:\n%s", stderr.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	if !strings.Contains(ready, "ebpf: not attached (peer credentials only)") {
		t.Fatalf("/readyz: %q", ready)
	}
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", port))
	if err != nil {
		t.Fatal(err)
	}
	metrics, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(metrics), "\npgward_ebpf_probes_attached 0\n") {
		t.Fatalf("metrics lack pgward_ebpf_probes_attached 0")
	}
	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("exit after SIGTERM: %v\n%s", err, stderr.String())
		}
	case <-time.After(40 * time.Second):
		t.Fatal("no exit after SIGTERM")
	}
	if n := strings.Count(stderr.String(), `"msg":"eBPF unavailable`); n != 1 {
		t.Fatalf("eBPF fallback said %d times at WARN:\n%s", n, stderr.String())
	}
	if !strings.Contains(stderr.String(), `"level":"WARN","msg":"eBPF unavailable`) {
		t.Fatalf("fallback not at WARN:\n%s", stderr.String())
	}
}

func freePort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}
