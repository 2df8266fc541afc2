package main

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"

	"github.com/pgward/pgward/broker"
	"github.com/pgward/pgward/exporter"
)

// keygen's key signs a real audit sink's checkpoints; verify proves the
// file with the public key and the log, and catches a cut tail through the
// log's anchor or a --checkpoint; flags behave conventionally.
func TestAuditKeygenAndVerify(t *testing.T) {
	dir := t.TempDir()
	prefix := filepath.Join(dir, "k")
	if code, out, errs := runCLI("audit", "keygen", "--out", prefix); code != exitOK || !strings.Contains(out, "k.pub") {
		t.Fatalf("keygen: %d\n%s%s", code, out, errs)
	}
	if st, err := os.Stat(prefix + ".key"); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("private key file: %v %v", st, err)
	}
	if code, _, _ := runCLI("audit", "keygen", "--out", prefix); code != exitFailure {
		t.Fatal("keygen overwrote an existing key")
	}
	priv, _ := os.ReadFile(prefix + ".key")
	key, err := exporter.ParseCheckpointKey(string(priv))
	if err != nil {
		t.Fatal(err)
	}

	auditPath, logPath := filepath.Join(dir, "audit.jsonl"), filepath.Join(dir, "pgward.log")
	lf, _ := os.Create(logPath)
	log := slog.New(slog.NewJSONHandler(lf, nil))
	a, err := exporter.OpenAudit(exporter.AuditConfig{Path: auditPath, Checkpoint: exporter.CheckpointConfig{EveryLines: 4}}, nil, log, exporter.WithCheckpointKey(key))
	if err != nil {
		t.Fatal(err)
	}
	obs := exporter.NewObserver(log, nil, a)
	s := &broker.SessionInfo{SessionID: "s1", RequestID: "r1", Upstream: "orders", User: "u", Success: true}
	// Ten lines: the session's start and nine statements.
	ctx, req := obs.Begin(context.Background(), &broker.Request{RequestID: s.RequestID})
	sess, err := req.Started(ctx, &broker.AuthRequest{RequestID: s.RequestID}, s)
	if err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= 9; i++ {
		if err := sess.Statements(ctx, []*broker.QueryEvent{{Index: int64(i), Text: "SELECT 1"}}); err != nil {
			t.Fatal(err)
		}
	}
	a.Close()
	lf.Close()
	pub := prefix + ".pub"

	code, out, errs := runCLI("audit", "verify", "--key", pub, "--log", logPath, auditPath)
	if code != exitOK || !strings.Contains(out, "ok: all 13 lines proven by 3 signed checkpoints") {
		t.Fatalf("intact: %d\n%s%s", code, out, errs)
	}
	code, out, _ = runCLI("audit", "verify", auditPath)
	if code != exitOK || !strings.Contains(out, "nothing is keyed") {
		t.Fatalf("without --key: %d\n%s", code, out)
	}

	// Cut after the second checkpoint (line 10 of 13).
	data, _ := os.ReadFile(auditPath)
	lines := strings.SplitAfter(string(data), "\n")
	cut := filepath.Join(dir, "cut.jsonl")
	os.WriteFile(cut, []byte(strings.Join(lines[:10], "")), 0o600)
	if code, out, errs := runCLI("audit", "verify", "--key", pub, cut); code != exitOK {
		t.Fatalf("a cut after a checkpoint, without an anchor: %d\n%s%s", code, out, errs)
	}
	code, _, errs = runCLI("audit", "verify", "--key", pub, "--log", logPath, cut)
	if code != exitBadInput || !strings.Contains(errs, "ends at seq 10, before it: lines were cut") {
		t.Fatalf("cut with --log: %d\n%s", code, errs)
	}
	logData, _ := os.ReadFile(logPath)
	anchors, err := exporter.ReadLogAnchors(strings.NewReader(string(logData)))
	if err != nil || len(anchors) != 1 {
		t.Fatal(anchors, err)
	}
	code, _, errs = runCLI("audit", "verify", "--key", pub, "--checkpoint", anchors[0].Anchor(), cut)
	if code != exitBadInput || !strings.Contains(errs, "lines were cut") {
		t.Fatalf("cut with --checkpoint: %d\n%s", code, errs)
	}
	// Another line appended: unproven.
	forged := filepath.Join(dir, "forged.jsonl")
	os.WriteFile(forged, []byte(strings.Join(lines[:12], "")), 0o600) // drops the shutdown checkpoint
	code, _, errs = runCLI("audit", "verify", "--key", pub, forged)
	if code != exitBadInput || !strings.Contains(errs, "lines 11–12 unproven: after the last checkpoint") {
		t.Fatalf("tail after the last checkpoint: %d\n%s", code, errs)
	}

	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"audit"}, exitUsage, "usage:"},
		{[]string{"audit", "frob"}, exitUsage, "usage:"},
		{[]string{"audit", "verify", "--help"}, exitOK, "-key"},
		{[]string{"audit", "verify", "--bogus", auditPath}, exitUsage, "flag provided but not defined"},
		{[]string{"audit", "verify", "--key", pub}, exitUsage, "no audit file"},
		{[]string{"audit", "verify", "--key", prefix + ".key", auditPath}, exitUsage, "is it the private key?"},
		{[]string{"audit", "verify", "--log", logPath, auditPath}, exitUsage, "need --key"},
		{[]string{"audit", "verify", "--key", pub, "--checkpoint", "cp1.x", auditPath}, exitUsage, "checkpoint anchor"},
		{[]string{"audit", "keygen", "extra"}, exitUsage, "unexpected argument"},
	} {
		code, out, errs := runCLI(tc.args...)
		if code != tc.code || !strings.Contains(out+errs, tc.want) {
			t.Errorf("%v: %d, want %d with %q\n%s%s", tc.args, code, tc.code, tc.want, out, errs)
		}
		if strings.Contains(out+errs, strings.Split(string(priv), "\n")[1]) {
			t.Errorf("%v printed the private key", tc.args)
		}
	}
}

// check-config reads audit.checkpoint and says what it does.
func TestCheckConfigCheckpoint(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "c.yaml")
	// check-config fetches the key as the agent does at start.
	if code, _, errs := runCLI("audit", "keygen", "--out", filepath.Join(dir, "k")); code != exitOK {
		t.Fatal(errs)
	}
	priv, _ := os.ReadFile(filepath.Join(dir, "k.key"))
	secretsYAML, _ := yaml.Marshal(map[string]map[string]map[string]string{"pgward": {"audit_checkpoint": {"password": string(priv)}}})
	os.WriteFile(filepath.Join(dir, "secrets.yaml"), secretsYAML, 0o600)
	os.WriteFile(cfg, []byte(`upstreams:
  orders: { address: /var/run/postgresql/.s.PGSQL.5432 }
secrets: { backend: env, file: { path: `+dir+`/secrets.yaml } }
audit:
  path: `+dir+`/audit.jsonl
  checkpoint: { every_lines: 500, every: 30s, key: { backend: file, upstream: pgward, role: audit_checkpoint } }
`), 0o644)
	code, out, errs := runCLI("check-config", cfg)
	if code != exitOK || !strings.Contains(out, "Audit checkpoints signed every 500 lines or 30s with the key pgward.audit_checkpoint of the file backend") {
		t.Fatalf("%d\n%s%s", code, out, errs)
	}
	// The key's backend must be configured; a key under a real upstream is refused.
	os.WriteFile(cfg, []byte(`upstreams:
  orders: { address: /var/run/postgresql/.s.PGSQL.5432 }
secrets: { backend: env }
audit:
  path: /var/log/pgward/audit.jsonl
  checkpoint: { every: 1ms, key: { backend: file, upstream: orders, role: r } }
`), 0o644)
	code, _, errs = runCLI("check-config", cfg)
	for _, want := range []string{"secrets.file.path", ":6: audit.checkpoint.key.upstream", "audit.checkpoint.every"} {
		if code != exitFailure || !strings.Contains(errs, want) {
			t.Errorf("%d: lacks %q:\n%s", code, want, errs)
		}
	}
}
