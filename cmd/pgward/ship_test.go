package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgward/pgward/exporter"
	"github.com/pgward/pgward/testenv"
)

// TestShipSurvivesKill9: pgward ships its audit to a real OpenTelemetry
// Collector while statements run through it; it is killed with SIGKILL in
// the middle and started again. Every line of the audit files arrives at
// the collector byte for byte (at least once), and the files verify.
// (The collector stalls around the kill, so lines are undelivered then.)
// `pgward audit verify --otlp` verifies what the collector wrote.
func TestShipSurvivesKill9(t *testing.T) {
	pg := testenv.Require(t)
	col := testenv.RequireCollector(t)
	dir, err := os.MkdirTemp("", "pgws-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	port := freePort(t)
	secretsPath := filepath.Join(dir, "secrets.yaml")
	secrets := fmt.Sprintf("real:\n  %s: { password: %q }\n", testenv.ScramUser, testenv.ScramPassword)
	if err := os.WriteFile(secretsPath, []byte(secrets), 0o600); err != nil {
		t.Fatal(err)
	}
	auditPath := filepath.Join(dir, "audit.jsonl")
	cfgPath := filepath.Join(dir, "pgward.yaml")
	cfg := fmt.Sprintf(`listen: { unix_dir: %q, port: 5432 }
upstreams:
  real: { address: %q, database: %q }
secrets: { backend: file, file: { path: %q } }
principals:
  me: { match: { uid: [%d] } }
grants:
  - { principal: me, upstream: real, roles: [%s] }
audit:
  path: %q
  max_size: 65536
  max_files: 100
  otlp: { endpoint: %q, insecure: true, timeout: 2s }
metrics: { listen: "127.0.0.1:%d" }
ebpf: { enabled: "false" }
`, dir, pg.SocketPath(), testenv.Database, secretsPath, os.Getuid(), testenv.ScramUser, auditPath, col.GRPCAddr, port)
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	var (
		agent    *exec.Cmd
		agentErr *lockedBuffer
	)
	start := func() {
		agent, agentErr = startTestChild(t, "agent", []string{
			"PGWARD_CMD_CHILD=agent --config " + cfgPath, "PGWARD_LOG_LEVEL=warn", "PGWARD_LOG_FORMAT=text",
		})
		waitHTTP(t, fmt.Sprintf("http://127.0.0.1:%d/readyz", port), agent, agentErr)
	}
	dsn := fmt.Sprintf("host=%s port=5432 user=%s dbname=real sslmode=disable", dir, testenv.ScramUser)
	queries := func(n int) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		conn, err := pgx.Connect(ctx, dsn)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close(ctx)
		for i := range n {
			if _, err := conn.Exec(ctx, "select $1::int, 'some text to fill the audit line'", i); err != nil {
				t.Fatal(err)
			}
		}
	}

	start()
	queries(200)
	// The collector stalls, so lines are surely undelivered (some in
	// flight) when pgward gets SIGKILL: no Close, no final save.
	if err := col.Stall(); err != nil {
		t.Fatal(err)
	}
	queries(200)
	_ = agent.Process.Kill()
	_ = agent.Wait()
	before := len(auditLines(t, auditPath))
	if recs, _ := col.Logs(); len(recs) >= before {
		t.Fatalf("all %d lines arrived before the kill; the test wants some undelivered", before)
	}
	if err := col.Resume(); err != nil {
		t.Fatal(err)
	}
	start()
	queries(400)
	want := auditLines(t, auditPath)
	if len(want) <= before {
		t.Fatalf("%d audit lines after the restart, %d before", len(want), before)
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		recs, err := col.Logs()
		if err != nil {
			t.Fatal(err)
		}
		got := map[string]bool{}
		for _, r := range recs {
			got[r.Body] = true
		}
		missing := 0
		var firstMissing, lastMissing string
		for _, l := range want {
			if !got[l] {
				if missing == 0 {
					firstMissing = l
				}
				lastMissing = l
				missing++
			}
		}
		if missing == 0 {
			t.Logf("%d audit lines, %d records arrived (duplicates after the kill: %d)", len(want), len(recs), len(recs)-len(want))
			break
		}
		if time.Now().After(deadline) {
			state, _ := os.ReadFile(auditPath + ".ship")
			lag, _ := scrapeMetric(fmt.Sprintf("http://127.0.0.1:%d/metrics", port), "pgward_audit_ship_lag_events")
			t.Fatalf("%d of %d audit lines never arrived at the collector (lag metric %v)\nfirst: %.300s\nlast: %.300s\ncursor: %s\nfiles: %v",
				missing, len(want), lag, firstMissing, lastMissing, state, auditFilesOf(t, auditPath))
		}
		time.Sleep(200 * time.Millisecond)
	}
	if code, out, errs := runCLI(append([]string{"audit", "verify"}, auditFilesOf(t, auditPath)...)...); code != exitOK {
		t.Fatalf("audit verify: %d\n%s\n%s", code, out, errs)
	}
	// What arrived verifies too: in any order, with the duplicates.
	code, out, errs := runCLI("audit", "verify", "--otlp", col.OutputPath)
	host, _ := os.Hostname()
	// (A session's end may be audited after want was read: at least.)
	var lines int
	if m := regexp.MustCompile(`, (\d+) lines\n`).FindStringSubmatch(out); m != nil {
		lines, _ = strconv.Atoi(m[1])
	}
	if code != exitOK || !strings.Contains(out, "node "+host+":") || lines < len(want) {
		t.Fatalf("audit verify --otlp: %d\n%s\n%s", code, out, errs)
	}
	t.Logf("audit verify --otlp:\n%s", out)
	stopTestChild(t, agent, agentErr)
}

// auditLines returns every line of the audit files, oldest first.
func auditLines(t *testing.T, path string) []string {
	t.Helper()
	return testenv.FileLines(t, auditFilesOf(t, path)...)
}

// auditFilesOf is exporter.AuditFiles, failing the test on an error.
func auditFilesOf(t testing.TB, path string) []string {
	t.Helper()
	files, err := exporter.AuditFiles(path)
	if err != nil {
		t.Fatal(err)
	}
	return files
}
