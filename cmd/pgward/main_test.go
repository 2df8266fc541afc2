package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
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
	os.WriteFile(filepath.Join(dir, "secrets.yaml"), []byte("orders:\n  orders_rw: { password: x }\n"), 0o600)
	good := filepath.Join(dir, "good.yaml")
	os.WriteFile(good, []byte(`upstreams:
  orders: { address: /var/run/postgresql/.s.PGSQL.5432 }
secrets: { file: { path: `+dir+`/secrets.yaml } }
principals:
  billing: { match: { uid: [1001] } }
grants:
  - { principal: billing, upstream: orders, roles: [orders_rw] }
audit: { path: `+dir+`/audit.jsonl }
`), 0o644)
	code, out, errs := runCLI("check-config", good)
	if code != exitOK || !strings.Contains(out, "billing: orders_rw on orders") || !strings.Contains(out, "dbname=orders") {
		t.Fatalf("code %d\n%s\n%s", code, out, errs)
	}
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(bad, []byte("upstreams:\n  orders: { address: nope }\ngrants:\n  - { principal: ghost, upstream: orders, roles: [r] }\n"), 0o644)
	code, _, errs = runCLI("check-config", bad)
	if code != exitFailure || !strings.Contains(errs, "bad.yaml:2: upstreams.orders.address") ||
		!strings.Contains(errs, "bad.yaml:4: grants[0].principal") || !strings.Contains(errs, "audit.path") ||
		!strings.Contains(errs, "the agent would not start") {
		t.Fatalf("code %d\n%s", code, errs)
	}
	if code, _, _ := runCLI("check-config", filepath.Join(dir, "missing.yaml")); code != exitFailure {
		t.Fatalf("missing file: %d", code)
	}
}

// Every verb: -h/--help prints its usage on stdout and exits 0; an unknown
// flag or an extra argument exits 2 with a message on stderr.
func TestVerbConventions(t *testing.T) {
	sleep := exec.Command("sleep", "30")
	if err := sleep.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { sleep.Process.Kill(); sleep.Wait() }()
	notAgent := strconv.Itoa(sleep.Process.Pid)
	tests := []struct {
		args   []string
		code   int
		stdout string // substring
		stderr string // substring
	}{
		{[]string{"--help"}, exitOK, "Usage:", ""},
		{[]string{}, exitUsage, "", "Usage:"},
		{[]string{"frobnicate"}, exitUsage, "", "unknown command"},
		{[]string{"agent", "--help"}, exitOK, "usage: pgward agent [flags]", ""},
		{[]string{"agent", "-h"}, exitOK, "-config", ""},
		{[]string{"agent", "--confg", "x"}, exitUsage, "", "flag provided but not defined: -confg"},
		{[]string{"agent", "extra"}, exitUsage, "", `unexpected argument "extra"`},
		{[]string{"check-config", "--help"}, exitOK, "usage: pgward check-config FILE", ""},
		{[]string{"check-config", "-h"}, exitOK, "Exit 0", ""},
		{[]string{"check-config"}, exitUsage, "", "missing FILE"},
		{[]string{"check-config", "a.yaml", "b.yaml"}, exitUsage, "", `unexpected argument "b.yaml"`},
		{[]string{"check-config", "--strict", "a.yaml"}, exitUsage, "", "flag provided but not defined: -strict"},
		{[]string{"check-config", "a.yaml", "--help"}, exitOK, "usage: pgward check-config", ""},
		{[]string{"audit", "--help"}, exitOK, "pgward audit verify", ""},
		{[]string{"audit", "verify", "--help"}, exitOK, "usage: pgward audit verify [flags] FILE...", ""},
		{[]string{"audit", "verify"}, exitUsage, "", "no audit file given"},
		{[]string{"audit", "verify", "--bogus", "f"}, exitUsage, "", "not defined: -bogus"},
		{[]string{"audit", "keygen", "-h"}, exitOK, "usage: pgward audit keygen [flags]", ""},
		{[]string{"audit", "keygen", "--bogus"}, exitUsage, "", "not defined: -bogus"},
		{[]string{"audit", "keygen", "extra"}, exitUsage, "", `unexpected argument "extra"`},
		{[]string{"reload", "--help"}, exitOK, "usage: pgward reload [flags]", ""},
		{[]string{"reload"}, exitUsage, "", "--pid PID is required"},
		{[]string{"reload", "--pid", "1", "extra"}, exitUsage, "", `unexpected argument "extra"`},
		{[]string{"reload", "--pid", notAgent}, exitFailure, "", "not a pgward agent; nothing signalled"},
		{[]string{"reload", "--pid", "2147483646"}, exitFailure, "", "no process with pid"},
		{[]string{"demo", "--help"}, exitOK, "usage: pgward demo [flags]", ""},
		{[]string{"demo", "--chek"}, exitUsage, "", "not defined: -chek"},
		{[]string{"demo", "now"}, exitUsage, "", `unexpected argument "now"`},
		{[]string{"version", "--help"}, exitOK, "usage: pgward version", ""},
		{[]string{"version", "extra"}, exitUsage, "", `unexpected argument "extra"`},
		{[]string{"version"}, exitOK, "go " + strings.TrimPrefix(runtime.Version(), "go"), ""},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			code, out, errs := runCLI(tt.args...)
			if code != tt.code || !strings.Contains(out, tt.stdout) || !strings.Contains(errs, tt.stderr) {
				t.Fatalf("exit %d (want %d)\nstdout:\n%s\nstderr:\n%s", code, tt.code, out, errs)
			}
		})
	}
	if sleep.ProcessState != nil {
		t.Fatal("reload signalled a process that is not pgward")
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

// The example configuration the README's systemd install copies passes
// check-config, with its files (secrets, CA) and directories (socket,
// audit) stood in under a temporary root.
func TestExampleConfigPassesCheckConfig(t *testing.T) {
	text, err := os.ReadFile(filepath.Join("..", "..", "deploy", "systemd", "pgward.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	for _, d := range []string{"etc/pgward", "var/log/pgward", "run/pgward"} {
		os.MkdirAll(filepath.Join(root, d), 0o750)
	}
	ca, err := testenv.NewCA()
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(root, "etc/pgward/ca.pem"), ca.CertPEM, 0o644)
	os.WriteFile(filepath.Join(root, "etc/pgward/secrets.yaml"), []byte("orders:\n  orders_rw: { password: x }\n"), 0o600)
	cfg := string(text)
	for _, d := range []string{"/etc/pgward/", "/var/log/pgward/", "/run/pgward"} {
		cfg = strings.ReplaceAll(cfg, d, filepath.Join(root, d)+strings.Repeat("/", strings.Count(d[len(d)-1:], "/")))
	}
	path := filepath.Join(root, "etc/pgward/pgward.yaml")
	os.WriteFile(path, []byte(cfg), 0o640)
	if code, out, errs := runCLI("check-config", path); code != exitOK || !strings.Contains(out, "billing: orders_rw on orders") {
		t.Fatalf("check-config of deploy/systemd/pgward.yaml: exit %d\n%s\n%s", code, out, errs)
	}
	// The README refers to it, and states the Go version go.mod asks for.
	readme, _ := os.ReadFile(filepath.Join("..", "..", "README.md"))
	gomod, _ := os.ReadFile(filepath.Join("..", "..", "go.mod"))
	if !strings.Contains(string(readme), "deploy/systemd/pgward.yaml") {
		t.Error("README does not point to deploy/systemd/pgward.yaml")
	}
	var goVersion string
	for _, l := range strings.Split(string(gomod), "\n") {
		if v, ok := strings.CutPrefix(l, "go "); ok {
			goVersion = strings.TrimSpace(v)
		}
	}
	if goVersion == "" || !strings.Contains(string(readme), "Go ≥ "+goVersion+" ") {
		t.Errorf("README does not state Go ≥ %s (go.mod)", goVersion)
	}
}
