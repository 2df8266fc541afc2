package broker_test

import (
	"os/exec"
	"strings"
	"testing"
)

// TestNoOpenTelemetry: the broker reports a session's telemetry through its
// Observer and makes no spans itself, so neither it nor any package under
// it depends on OpenTelemetry (the exporter makes the spans).
func TestNoOpenTelemetry(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "github.com/pgward/pgward/broker/...").CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps: %v\n%s", err, out)
	}
	for _, p := range strings.Fields(string(out)) {
		if strings.HasPrefix(p, "go.opentelemetry.io/") {
			t.Errorf("broker depends on %s", p)
		}
	}
}
