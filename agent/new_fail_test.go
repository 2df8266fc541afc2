package agent

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// New failing after it opened things (here: the metrics address is taken)
// returns the error, does not panic, and leaves nothing open: the socket is
// gone and the audit file closed.
func TestNewFailsCleanly(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	dir := t.TempDir()
	secrets := filepath.Join(dir, "secrets.yaml")
	if err := os.WriteFile(secrets, []byte("orders:\n  app: { password: x }\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	yaml := fmt.Sprintf(`
listen: { unix_dir: %q }
upstreams:
  orders: { address: "127.0.0.1:1", tls: { mode: disable } }
secrets: { backend: file, file: { path: %q } }
principals:
  p: { match: { uid: [%d] } }
grants:
  - { principal: p, upstream: orders, roles: [app] }
audit: { path: %q }
metrics: { listen: %q }
ebpf: { enabled: "false" }
`, dir, secrets, os.Getuid(), filepath.Join(dir, "audit.jsonl"), busy.Addr().String())
	cfg, err := ParseConfig([]byte(yaml), "pgward.yaml")
	if err != nil {
		t.Fatal(err)
	}
	before := countFDs(t)
	a, err := New(context.Background(), Options{Config: cfg})
	if err == nil || a != nil || !strings.Contains(err.Error(), "metrics.listen") {
		t.Fatalf("New with the metrics address taken = %v, %v; want an error naming metrics.listen", a, err)
	}
	if _, err := os.Stat(cfg.Listen.SocketPath()); !os.IsNotExist(err) {
		t.Errorf("socket %s left behind: %v", cfg.Listen.SocketPath(), err)
	}
	if after := countFDs(t); after > before {
		t.Errorf("%d descriptors open after the failed New, %d before", after, before)
	}
}

func countFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}
