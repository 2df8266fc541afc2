package agent

import (
	"context"
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pgward/pgward/testenv"
)

// The ready line names the metrics address actually bound: with
// metrics.listen 127.0.0.1:0 in the file, the real port.
func TestReadyLineShowsBoundAddress(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "secrets.yaml"), []byte("orders:\n  orders_rw: { password: x }\n"), 0o600)
	cfg, err := ParseConfig([]byte(strings.ReplaceAll(`listen: { unix_dir: DIR/run }
upstreams:
  orders: { address: DIR/no-postgres/.s.PGSQL.5432 }
secrets: { file: { path: DIR/secrets.yaml } }
principals:
  billing: { match: { uid: [1001] } }
grants:
  - { principal: billing, upstream: orders, roles: [orders_rw] }
audit: { path: DIR/audit.jsonl }
metrics: { listen: "127.0.0.1:0" }
ebpf: { enabled: "false" }
`, "DIR", dir)), "pgward.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var buf testenv.SyncBuffer
	log := slog.New(slog.NewJSONHandler(&buf, nil))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	a, err := New(ctx, Options{Config: cfg, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(buf.String(), "pgward agent ready") && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	<-done
	for _, line := range strings.Split(buf.String(), "\n") {
		if !strings.Contains(line, "pgward agent ready") {
			continue
		}
		var v struct{ Metrics string }
		json.Unmarshal([]byte(line), &v)
		if v.Metrics != a.MetricsAddr().String() || strings.HasSuffix(v.Metrics, ":0") {
			t.Fatalf("ready line shows metrics %q, bound %s", v.Metrics, a.MetricsAddr())
		}
		return
	}
	t.Fatalf("no ready line:\n%s", buf.String())
}
