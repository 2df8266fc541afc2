package agent

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgward/pgward/broker"
	"github.com/pgward/pgward/broker/secrets"
	"github.com/pgward/pgward/exporter"
	"github.com/pgward/pgward/testenv"
)

// A real agent in front of the real Postgres signs its audit (key from the
// file secrets backend, every 5 lines, small files so that it rotates);
// the rotated set verifies whole with the public key and the log's anchor.
// Then tampered copies — each accepted by the chain-only verifier, which is
// all `pgward audit verify` had before checkpoints — are caught, with the
// unproven lines named. The key is in no output.
func TestAuditCheckpointsEndToEnd(t *testing.T) {
	privPEM, pubPEM, err := exporter.GenerateCheckpointKey()
	if err != nil {
		t.Fatal(err)
	}
	pub, err := exporter.ParseCheckpointPublicKey(pubPEM)
	if err != nil {
		t.Fatal(err)
	}
	keyBody := strings.Split(strings.TrimSpace(string(privPEM)), "\n")[1] // the key's base64, PEM body
	h := newHarness(t, func(h *harness, c *Config) {
		f, err := os.OpenFile(c.Secrets.File.Path, os.O_APPEND|os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(f, "pgward:\n  audit_checkpoint:\n    password: |\n      %s\n",
			strings.ReplaceAll(strings.TrimSpace(string(privPEM)), "\n", "\n      "))
		f.Close()
		c.Audit.MaxSize = 16 << 10
		c.Audit.MaxFiles = 20
		c.Audit.Checkpoint = exporter.CheckpointConfig{EveryLines: 5, Every: time.Hour,
			Key: &exporter.CheckpointKeyRef{Upstream: "pgward", Role: "audit_checkpoint"}}
	})
	ctx := context.Background()
	c := h.connect(t, testenv.ScramUser, "orders")
	for i := 0; i < 60; i++ {
		if _, err := c.Exec(ctx, fmt.Sprintf("select %d", i), pgx.QueryExecModeSimpleProtocol); err != nil {
			t.Fatal(err)
		}
	}
	c.Close(ctx)
	h.stop() // the shutdown checkpoint

	files := auditFiles(t, h.auditPath)
	if len(files) < 3 {
		t.Fatalf("audit did not rotate: %v", files)
	}
	logs := h.logs.String()
	anchors, err := exporter.ReadLogAnchors(strings.NewReader(logs))
	if err != nil || len(anchors) != 1 {
		t.Fatalf("log anchors %v, %v", anchors, err)
	}
	rep := verifyReport(t, files, exporter.VerifyOptions{Key: pub, Anchors: anchors})
	if !rep.OK() || rep.Checkpoints < 20 {
		t.Fatalf("intact rotated set:\n%s", reportText(rep))
	}
	if strings.Contains(logs, "audit trail is unkeyed") {
		t.Error("keyed agent warned that its audit is unkeyed")
	}

	// The key is nowhere: audit files, logs.
	for _, p := range files {
		if strings.Contains(string(mustReadFile(t, p)), keyBody) {
			t.Errorf("the signing key is in %s", p)
		}
	}
	if strings.Contains(logs, keyBody) {
		t.Error("the signing key is in the log")
	}

	newest := files[len(files)-1]
	lines := splitLines(string(mustReadFile(t, newest)))
	var cps []int // 0-based indexes of checkpoint lines in the newest file
	for i, l := range lines {
		if strings.Contains(l, `"event":"audit.checkpoint"`) {
			cps = append(cps, i)
		}
	}
	if len(cps) < 3 || cps[len(cps)-1] != len(lines)-1 {
		t.Fatalf("newest file: checkpoints at %v of %d lines", cps, len(lines))
	}
	rest := files[:len(files)-1]
	dir := t.TempDir()
	prevOfFirst := firstPrevHash(t, lines[0])

	cutAt := cps[len(cps)-2] + 1 // keep up to the second-to-last checkpoint
	appended := append(append([]string{}, lines...), strings.Replace(lines[len(lines)-3], `select`, `drop table evidence; select`, 1))
	deleted := append(append([]string{}, lines[:cps[0]+2]...), lines[cps[0]+4:]...)
	sigEdited := append([]string{}, lines...)
	sigEdited[cps[1]] = replaceField(t, lines[cps[1]], "signature", base64.StdEncoding.EncodeToString(make([]byte, 64)))

	tests := []struct {
		name    string
		lines   []string
		anchors []exporter.Checkpoint
		want    []string
	}{
		{"tail cut at a line boundary", lines[:cutAt], anchors,
			[]string{fmt.Sprintf("ends at seq %d, before it: lines were cut", cutAt)}},
		{"forged line appended", rechainLines(appended, prevOfFirst), anchors,
			[]string{fmt.Sprintf("line %d unproven: after the last checkpoint", len(appended))}},
		{"lines deleted, file re-chained", rechainLines(deleted, prevOfFirst), nil,
			[]string{"the lines before it were re-chained", fmt.Sprintf("lines %d–", cps[0]+2)}},
		{"checkpoint signature edited, file re-chained", rechainLines(sigEdited, prevOfFirst), nil,
			[]string{fmt.Sprintf("checkpoint (seq %d): signature does not verify", cps[1]+1)}},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := filepath.Join(dir, fmt.Sprintf("case%d.jsonl", i))
			if err := os.WriteFile(p, []byte(strings.Join(tt.lines, "")), 0o600); err != nil {
				t.Fatal(err)
			}
			set := append(append([]string{}, rest...), p)
			// The verifier of the chain alone (all there was before) accepts it.
			if _, err := exporter.VerifyFiles(set...); err != nil {
				t.Fatalf("chain-only verify rejects the tampered copy already: %v", err)
			}
			rep := verifyReport(t, set, exporter.VerifyOptions{Key: pub, Anchors: tt.anchors})
			out := reportText(rep)
			if rep.OK() {
				t.Fatalf("tampered copy verifies:\n%s", out)
			}
			for _, w := range tt.want {
				if !strings.Contains(out, w) {
					t.Errorf("report lacks %q:\n%s", w, out)
				}
			}
		})
	}
	// Without the anchor, the cut tail is the window checkpoints leave open.
	p := filepath.Join(dir, "cut.jsonl")
	os.WriteFile(p, []byte(strings.Join(lines[:cutAt], "")), 0o600)
	if rep := verifyReport(t, append(append([]string{}, rest...), p), exporter.VerifyOptions{Key: pub}); !rep.OK() {
		t.Fatalf("a cut right after a checkpoint is only visible with an anchor:\n%s", reportText(rep))
	}
}

// A key that does not parse stops the agent at start, and the error does
// not quote it; with no key the agent warns that its audit is unkeyed.
func TestAuditCheckpointKeyErrors(t *testing.T) {
	const canary = "not-a-key-canary-7Qx"
	dir := t.TempDir()
	sec := filepath.Join(dir, "secrets.yaml")
	os.WriteFile(sec, []byte("pgward:\n  audit_checkpoint: { password: "+canary+" }\n"), 0o600)
	cfg := &Config{
		Config: broker.Config{
			Listen:    broker.ListenConfig{UnixDir: dir, Port: 5432},
			Upstreams: map[string]broker.UpstreamConfig{"orders": {Address: "/nonexistent/.s.PGSQL.5432"}},
		},
		Secrets: SecretsConfig{Backend: "file", File: secrets.FileConfig{Path: sec}},
		Audit: exporter.AuditConfig{Path: filepath.Join(dir, "audit.jsonl"),
			Checkpoint: exporter.CheckpointConfig{Key: &exporter.CheckpointKeyRef{Upstream: "pgward", Role: "audit_checkpoint"}}},
		EBPF: EBPFConfig{Enabled: "false"},
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	logs := &testenv.SyncBuffer{}
	_, err := New(context.Background(), Options{Config: cfg, Logger: newJSONLogger(logs)})
	if err == nil || !strings.Contains(err.Error(), "audit.checkpoint.key") || strings.Contains(err.Error()+logs.String(), canary) {
		t.Fatalf("bad key: %v\n%s", err, logs.String())
	}
	cfg.Audit.Checkpoint.Key.Role = "missing"
	if _, err := New(context.Background(), Options{Config: cfg, Logger: newJSONLogger(logs)}); err == nil || !strings.Contains(err.Error(), "pgward.missing") {
		t.Fatalf("missing key: %v", err)
	}
	// A key named like a configured upstream is refused by validation.
	cfg.Audit.Checkpoint.Key.Upstream = "orders"
	if err := cfg.Validate(); err == nil || !strings.Contains(err.Error(), "audit.checkpoint.key.upstream") {
		t.Fatalf("key under a configured upstream: %v", err)
	}
	// The env backend holds the key as the base64 of its seed.
	t.Setenv("PGWARD_SECRET_PGWARD_AUDIT_CHECKPOINT", base64.StdEncoding.EncodeToString(make([]byte, 32)))
	cfg.Audit.Checkpoint.Key = &exporter.CheckpointKeyRef{Backend: "env", Upstream: "pgward", Role: "audit_checkpoint"}
	a, err := New(context.Background(), Options{Config: cfg, Logger: newJSONLogger(logs)})
	if err != nil {
		t.Fatalf("key from env: %v", err)
	}
	a.closeAll()
	if strings.Contains(logs.String(), "audit checkpoints are off") {
		t.Fatal("keyed agent warned that its audit is unkeyed")
	}
	cfg.Audit.Checkpoint.Key = nil
	a, err = New(context.Background(), Options{Config: cfg, Logger: newJSONLogger(logs)})
	if err != nil {
		t.Fatal(err)
	}
	a.closeAll()
	if !strings.Contains(logs.String(), `"level":"WARN","msg":"audit checkpoints are off`) {
		t.Fatalf("no WARN that the audit is unkeyed:\n%s", logs.String())
	}
}

func auditFiles(t *testing.T, path string) []string {
	t.Helper()
	var files []string
	for i := 50; i >= 1; i-- {
		if _, err := os.Stat(fmt.Sprintf("%s.%d", path, i)); err == nil {
			files = append(files, fmt.Sprintf("%s.%d", path, i))
		}
	}
	return append(files, path)
}

func verifyReport(t *testing.T, files []string, opts exporter.VerifyOptions) *exporter.VerifyReport {
	t.Helper()
	rep, err := exporter.VerifyAudit(files, opts)
	if err != nil {
		t.Fatal(err)
	}
	return rep
}

func reportText(r *exporter.VerifyReport) string {
	var b strings.Builder
	r.WriteText(&b)
	return b.String()
}

func mustReadFile(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func splitLines(s string) []string {
	lines := strings.SplitAfter(s, "\n")
	return lines[:len(lines)-1] // after the last newline
}

func firstPrevHash(t *testing.T, line string) string {
	t.Helper()
	i := strings.LastIndex(line, `"prev_hash":"`)
	if i < 0 {
		t.Fatalf("no prev_hash: %s", line)
	}
	return line[i+len(`"prev_hash":"`) : i+len(`"prev_hash":"`)+64]
}

// rechainLines recomputes seq and prev_hash, as someone with write access
// to the file but not the key would.
func rechainLines(lines []string, prev string) []string {
	out := make([]string, len(lines))
	for i, l := range lines {
		l = strings.TrimSuffix(l, "\n")
		l = l[:strings.LastIndex(l, `,"seq":`)] + fmt.Sprintf(`,"seq":%d,"prev_hash":"%s"}`, i+1, prev)
		sum := sha256.Sum256([]byte(l))
		prev = hex.EncodeToString(sum[:])
		out[i] = l + "\n"
	}
	return out
}

func replaceField(t *testing.T, line, field, value string) string {
	t.Helper()
	k := `"` + field + `":"`
	i := strings.Index(line, k)
	if i < 0 {
		t.Fatalf("no %s in %s", field, line)
	}
	j := strings.IndexByte(line[i+len(k):], '"')
	return line[:i+len(k)] + value + line[i+len(k)+j:]
}

func newJSONLogger(w io.Writer) *slog.Logger {
	return slog.New(slog.NewJSONHandler(w, nil))
}
