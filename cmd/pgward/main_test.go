package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pgward/pgward/exporter/otlptest"
	"github.com/pgward/pgward/testenv"
)

func runCLI(args ...string) (int, string, string) {
	var out, errb bytes.Buffer
	code := run(args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestCheckConfig(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.yaml")
	os.WriteFile(good, []byte(`upstreams:
  orders: { address: /var/run/postgresql/.s.PGSQL.5432 }
secrets: { file: { path: /etc/pgward/secrets.yaml } }
principals:
  billing: { match: { uid: [1001] } }
grants:
  - { principal: billing, upstream: orders, roles: [orders_rw] }
audit: { path: /var/log/pgward/audit.jsonl }
`), 0o644)
	code, out, errs := runCLI("check-config", good)
	if code != exitOK || !strings.Contains(out, "billing: orders_rw on orders") || !strings.Contains(out, "dbname=orders") {
		t.Fatalf("code %d\n%s\n%s", code, out, errs)
	}
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(bad, []byte("upstreams:\n  orders: { address: nope }\ngrants:\n  - { principal: ghost, upstream: orders, roles: [r] }\n"), 0o644)
	code, _, errs = runCLI("check-config", bad)
	if code != exitBadInput || !strings.Contains(errs, "bad.yaml:2: upstreams.orders.address") ||
		!strings.Contains(errs, "bad.yaml:4: grants[0].principal") || !strings.Contains(errs, "audit.path") {
		t.Fatalf("code %d\n%s", code, errs)
	}
	if code, _, _ := runCLI("check-config"); code != exitUsage {
		t.Fatalf("no file: %d", code)
	}
	if code, _, _ := runCLI("frobnicate"); code != exitUsage {
		t.Fatalf("unknown command: %d", code)
	}
	if code, out, _ := runCLI("version"); code != exitOK || !strings.HasPrefix(out, "pgward ") {
		t.Fatalf("version: %d %q", code, out)
	}
}

// The demo: a private Postgres, an agent, and the printed psql line run
// once; then the audit file it wrote must verify.
func TestDemoAndAuditVerify(t *testing.T) {
	if _, err := testenv.FindBinDir(); err != nil {
		testenv.Require(t)
	}
	// With an OTLP endpoint set, the demo exports its traces.
	rcv := otlptest.NewGRPC(t)
	t.Setenv("OTEL_EXPORTER_OTLP_ENDPOINT", rcv.Endpoint())
	t.Setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
	code, out, errs := runCLI("demo", "--check")
	if code != exitOK || !strings.Contains(out, "demo check: ok") || !strings.Contains(out, `psql "host=`) {
		t.Fatalf("demo --check: %d\n%s\n%s", code, out, errs)
	}
	if !strings.Contains(out, "audit chain ok") {
		t.Fatalf("demo did not verify its audit chain:\n%s", out)
	}
	var session bool
	for _, s := range rcv.Spans() {
		if s.Name == "pgward.session" && s.Attributes["pgward.request_id"] == s.TraceID {
			session = true
		}
	}
	if !session {
		t.Fatalf("demo exported no pgward.session span (%d spans)", len(rcv.Spans()))
	}
	dir := t.TempDir()
	if code, _, _ := runCLI("audit", "verify"); code != exitUsage {
		t.Fatal("audit verify without a file accepted")
	}
	if code, _, _ := runCLI("audit", "verify", filepath.Join(dir, "missing")); code != exitFailure {
		t.Fatal("missing file accepted")
	}
}
