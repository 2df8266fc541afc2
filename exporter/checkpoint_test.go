package exporter_test

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/pgward/pgward/broker"
	"github.com/pgward/pgward/exporter"
)

// testKey is a fresh key pair: the signing key as the secrets backend
// holds it (PEM), parsed, and the public key.
func testKey(t testing.TB) (exporter.CheckpointKey, ed25519.PublicKey, string) {
	t.Helper()
	priv, pub, err := exporter.GenerateCheckpointKey()
	if err != nil {
		t.Fatal(err)
	}
	k, err := exporter.ParseCheckpointKey(string(priv))
	if err != nil {
		t.Fatal(err)
	}
	p, err := exporter.ParseCheckpointPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	return k, p, string(priv)
}

// newSigned opens a sink with checkpoints; its JSON log goes to the
// fixture's buffer.
func newSigned(t testing.TB, cfg exporter.AuditConfig, key exporter.CheckpointKey) *fixture {
	t.Helper()
	if cfg.Path == "" {
		cfg.Path = filepath.Join(t.TempDir(), "audit.jsonl")
	}
	reg := prometheus.NewRegistry()
	m := exporter.NewMetrics(reg)
	logs := &bytes.Buffer{}
	log := slog.New(slog.NewJSONHandler(logs, nil))
	a, err := exporter.OpenAudit(cfg, m, log, exporter.WithCheckpointKey(key))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	return &fixture{obs: exporter.NewObserver(log, m, a), audit: a, reg: reg, m: m, logs: logs, path: cfg.Path}
}

func writeQueries(t testing.TB, fx *fixture, n int) {
	t.Helper()
	s := testSession()
	for i := 1; i <= n; i++ {
		if err := fx.obs.Query(context.Background(), s, &broker.QueryEvent{Index: int64(i), Text: fmt.Sprintf("SELECT %d", i)}); err != nil {
			t.Fatal(err)
		}
	}
}

func fileLines(t testing.TB, path string) []string {
	t.Helper()
	s := string(mustRead(t, path))
	if s == "" {
		return nil
	}
	lines := strings.SplitAfter(s, "\n")
	return lines[:len(lines)-1] // after the last newline
}

// rechain gives lines new seq (from 1) and prev_hash fields, as an attacker
// who has the file but not the key would after deleting or adding lines.
func rechain(lines []string, prev string) []string {
	out := make([]string, len(lines))
	for i, l := range lines {
		l = strings.TrimSuffix(l, "\n")
		l = l[:strings.LastIndex(l, `,"seq":`)]
		l += fmt.Sprintf(`,"seq":%d,"prev_hash":"%s"}`, i+1, prev)
		sum := sha256.Sum256([]byte(l))
		prev = hex.EncodeToString(sum[:])
		out[i] = l + "\n"
	}
	return out
}

// rechainFixHeads is rechain that also rewrites each checkpoint's
// head_seq and head_hash to the line before it: only the signature is left
// to tell.
func rechainFixHeads(lines []string) []string {
	out := make([]string, 0, len(lines))
	for _, l := range lines {
		if strings.Contains(l, exporter.EventCheckpoint) {
			var m map[string]any
			json.Unmarshal([]byte(l), &m)
			head := strings.TrimSuffix(out[len(out)-1], "\n")
			sum := sha256.Sum256([]byte(head))
			l = strings.Replace(l, fmt.Sprintf(`"head_seq":%v`, m["head_seq"]), fmt.Sprintf(`"head_seq":%d`, len(out)), 1)
			l = strings.Replace(l, m["head_hash"].(string), hex.EncodeToString(sum[:]), 1)
		}
		prev := exporter.ZeroHash
		if len(out) > 0 {
			sum := sha256.Sum256([]byte(strings.TrimSuffix(out[len(out)-1], "\n")))
			prev = hex.EncodeToString(sum[:])
		}
		l = strings.TrimSuffix(l, "\n")
		l = l[:strings.LastIndex(l, `,"seq":`)] + fmt.Sprintf(`,"seq":%d,"prev_hash":"%s"}`+"\n", len(out)+1, prev)
		out = append(out, l)
	}
	return out
}

func writeFile(t testing.TB, dir, name string, lines []string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(strings.Join(lines, "")), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func logAnchors(t testing.TB, logs string) []exporter.Checkpoint {
	t.Helper()
	cps, err := exporter.ReadLogAnchors(strings.NewReader(logs))
	if err != nil {
		t.Fatal(err)
	}
	return cps
}

func report(t testing.TB, paths []string, opts exporter.VerifyOptions) (*exporter.VerifyReport, string) {
	t.Helper()
	rep, err := exporter.VerifyAudit(paths, opts)
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	rep.WriteText(&b)
	return rep, b.String()
}

// The sink writes a checkpoint every every_lines lines and at Close, each
// signing the head it follows, each also logged with its anchor; the whole
// file is then proven.
func TestCheckpointEveryLinesAndShutdown(t *testing.T) {
	key, pub, _ := testKey(t)
	fx := newSigned(t, exporter.AuditConfig{Checkpoint: exporter.CheckpointConfig{EveryLines: 5, Every: time.Hour}}, key)
	writeQueries(t, fx, 23)
	if err := fx.audit.Close(); err != nil {
		t.Fatal(err)
	}
	var cps []int
	for i, l := range readLines(t, fx.path) {
		if l["event"] == exporter.EventCheckpoint {
			cps = append(cps, i+1)
			if l["head_seq"] != float64(i) || l["code"] != exporter.CodeCheckpoint {
				t.Errorf("checkpoint at line %d: head_seq %v code %v", i+1, l["head_seq"], l["code"])
			}
		}
	}
	if want := []int{6, 12, 18, 24, 28}; fmt.Sprint(cps) != fmt.Sprint(want) {
		t.Fatalf("checkpoints at lines %v, want %v", cps, want)
	}
	if got := metricValue(t, fx.reg, "pgward_audit_events_total", "event", exporter.EventCheckpoint); got != 5 {
		t.Errorf("pgward_audit_events_total{event=audit.checkpoint} = %v, want 5", got)
	}
	logs := fx.logs.String()
	if n := strings.Count(logs, `"msg":"audit checkpoint"`); n != 5 {
		t.Fatalf("%d checkpoint log lines, want 5:\n%s", n, logs)
	}
	anchors := logAnchors(t, logs)
	if len(anchors) != 1 || anchors[0].HeadSeq != 27 {
		t.Fatalf("latest anchor %+v, want head seq 27", anchors)
	}
	rep, out := report(t, []string{fx.path}, exporter.VerifyOptions{Key: pub, Anchors: anchors})
	if !rep.OK() || rep.Checkpoints != 5 || !strings.Contains(out, "lines 1–27 proven by 5 checkpoints") || !strings.Contains(out, "found at") {
		t.Fatalf("intact file:\n%s", out)
	}
	// Chain-only verification still accepts the file.
	verifyFile(t, fx.path)
}

// Tampered copies of a signed file, each reported with the lines it leaves
// unproven. Every case but "intact" passes chain-only verification, which
// is all that existed before checkpoints.
func TestVerifyCheckpointTampering(t *testing.T) {
	key, pub, _ := testKey(t)
	_, otherPub, _ := testKey(t)
	fx := newSigned(t, exporter.AuditConfig{Checkpoint: exporter.CheckpointConfig{EveryLines: 5, Every: time.Hour}}, key)
	writeQueries(t, fx, 23)
	fx.audit.Close()
	good := fileLines(t, fx.path) // checkpoints at 6, 12, 18, 24, 28
	anchors := logAnchors(t, fx.logs.String())
	forged := strings.Replace(good[26], "SELECT 23", "DROP TABLE evidence", 1)

	// Re-chained, with every checkpoint's head fields fixed up to match.
	deleted := append(append([]string{}, good[:7]...), good[9:]...)
	fixed := rechainFixHeads(deleted)

	noCPs := []string{}
	for _, l := range good {
		if !strings.Contains(l, exporter.EventCheckpoint) {
			noCPs = append(noCPs, l)
		}
	}
	otherSig := base64.StdEncoding.EncodeToString(make([]byte, 64))
	var m map[string]any
	json.Unmarshal([]byte(good[11]), &m)
	badSig := append(append([]string{}, good[:11]...), strings.Replace(good[11], m["signature"].(string), otherSig, 1))
	badSig = rechain(append(badSig, good[12:]...), exporter.ZeroHash)
	editedCP := append(append([]string{}, good[:11]...), strings.Replace(good[11], `"reason":"lines"`, `"reason":"rotation"`, 1))
	editedCP = append(editedCP, good[12:]...)

	tests := []struct {
		name    string
		lines   []string
		key     ed25519.PublicKey
		anchors []exporter.Checkpoint
		want    []string // in the report
		ok      bool
	}{
		{name: "intact", lines: good, anchors: anchors, ok: true, want: []string{"lines 1–27 proven"}},
		{name: "tail cut after a checkpoint, no anchor", lines: good[:24], ok: true,
			want: []string{"lines 1–23 proven"}}, // the window the anchor closes
		{name: "tail cut after a checkpoint, log anchor", lines: good[:24], anchors: anchors,
			want: []string{"ends at seq 24, before it: lines were cut"}},
		{name: "tail cut between checkpoints", lines: good[:26],
			want: []string{"lines 1–23 proven", "lines 25–26 unproven: after the last checkpoint"}},
		{name: "forged line appended", lines: rechain(append(append([]string{}, good...), forged), exporter.ZeroHash), anchors: anchors,
			want: []string{"lines 1–27 proven", "line 29 unproven: after the last checkpoint"}},
		{name: "lines deleted, file re-chained", lines: rechain(deleted, exporter.ZeroHash),
			want: []string{"lines 1–5 proven by the checkpoint at line 6", "the lines before it were re-chained", "lines 7–26 unproven"}},
		{name: "lines deleted, re-chained, checkpoint heads fixed", lines: fixed,
			want: []string{"lines 1–5 proven", "checkpoint (seq 10): signature does not verify", "lines 7–26 unproven"}},
		{name: "checkpoint signature replaced, re-chained", lines: badSig,
			want: []string{"checkpoint (seq 12): signature does not verify"}},
		{name: "checkpoint line edited", lines: editedCP,
			want: []string{"prev_hash is not the hash of line 12", "lines 1–11 proven", "line 12 unproven: the chain breaks", "lines 13–27 proven"}},
		{name: "checkpoints removed, re-chained", lines: rechain(noCPs, exporter.ZeroHash),
			want: []string{"lines 1–23 unproven: no checkpoint signed with this key proves them"}},
		{name: "another key", lines: good, key: otherPub,
			want: []string{"was signed by key " + key.KeyID() + ", not by the given key"}},
	}
	dir := t.TempDir()
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := writeFile(t, dir, fmt.Sprintf("case%d.jsonl", i), tt.lines)
			if tt.name != "intact" && !strings.Contains(tt.name, "edited") {
				// What verify said before checkpoints: all fine.
				verifyFile(t, p)
			}
			k := pub
			if tt.key != nil {
				k = tt.key
			}
			rep, out := report(t, []string{p}, exporter.VerifyOptions{Key: k, Anchors: tt.anchors})
			if rep.OK() != tt.ok {
				t.Errorf("OK() = %v, want %v", rep.OK(), tt.ok)
			}
			for _, w := range tt.want {
				if !strings.Contains(out, w) {
					t.Errorf("report lacks %q", w)
				}
			}
			if t.Failed() {
				t.Logf("report:\n%s", out)
			}
		})
	}
}

// A checkpoint ends every rotated file, so each file is proven alone, and
// the set verifies as one chain with the log's latest anchor.
func TestCheckpointRotation(t *testing.T) {
	key, pub, _ := testKey(t)
	fx := newSigned(t, exporter.AuditConfig{MaxSize: 4096, MaxFiles: 5,
		Checkpoint: exporter.CheckpointConfig{EveryLines: 7, Every: time.Hour}}, key)
	writeQueries(t, fx, 60)
	fx.audit.Close()
	chain := []string{fx.path + ".3", fx.path + ".2", fx.path + ".1", fx.path}
	for _, p := range chain[:3] {
		lines := readLines(t, p)
		if last := lines[len(lines)-1]; last["event"] != exporter.EventCheckpoint || last["reason"] != "rotation" {
			t.Errorf("%s ends with %v (%v), want a rotation checkpoint", p, last["event"], last["reason"])
		}
		if rep, out := report(t, []string{p}, exporter.VerifyOptions{Key: pub}); !rep.OK() {
			t.Errorf("%s alone:\n%s", p, out)
		}
	}
	rep, out := report(t, chain, exporter.VerifyOptions{Key: pub, Anchors: logAnchors(t, fx.logs.String())})
	if !rep.OK() {
		t.Fatalf("rotated set:\n%s", out)
	}
	if rep, out := report(t, chain[1:], exporter.VerifyOptions{Key: pub}); !rep.OK() {
		t.Fatalf("without the oldest file:\n%s", out)
	}
	// An anchor from a rotated file not given is said to be older, not cut.
	old := logAnchors(t, strings.SplitN(fx.logs.String(), "\n", 2)[0])
	if rep, out := report(t, chain[2:], exporter.VerifyOptions{Key: pub, Anchors: old}); rep.OK() ||
		!strings.Contains(out, "older than their first line") {
		t.Fatalf("anchor in a file not given:\n%s", out)
	}
}

// With only time passing, the every timer signs what was written; async
// mode signs too.
func TestCheckpointEveryInterval(t *testing.T) {
	for _, d := range []exporter.Durability{exporter.DurabilityWrite, exporter.DurabilityAsync, exporter.DurabilityFsync} {
		t.Run(string(d), func(t *testing.T) {
			key, pub, _ := testKey(t)
			fx := newSigned(t, exporter.AuditConfig{Durability: d, Checkpoint: exporter.CheckpointConfig{EveryLines: 1000, Every: 100 * time.Millisecond}}, key)
			writeQueries(t, fx, 3)
			deadline := time.Now().Add(10 * time.Second)
			// Until the file ends with one (a tick may fall between the writes).
			endsInInterval := func() bool {
				lines := fileLines(t, fx.path) // async: maybe none yet
				return len(lines) > 0 && strings.Contains(lines[len(lines)-1], `"reason":"interval"`)
			}
			for !endsInInterval() {
				if time.Now().After(deadline) {
					t.Fatalf("no interval checkpoint:\n%s", mustRead(t, fx.path))
				}
				time.Sleep(20 * time.Millisecond)
			}
			if rep, out := report(t, []string{fx.path}, exporter.VerifyOptions{Key: pub}); !rep.OK() {
				t.Fatalf("%s", out)
			}
			// Idle: no further checkpoint while nothing is written.
			n := len(fileLines(t, fx.path))
			time.Sleep(350 * time.Millisecond)
			if m := len(fileLines(t, fx.path)); m != n {
				t.Errorf("idle sink wrote %d more lines", m-n)
			}
			fx.audit.Close()
			if m := len(fileLines(t, fx.path)); m != n {
				t.Errorf("close after a checkpoint wrote %d more lines", m-n)
			}
		})
	}
}

// The key never appears in the audit file, the log, an error or a print.
func TestCheckpointKeyNeverPrinted(t *testing.T) {
	key, _, privPEM := testKey(t)
	block := strings.Join(strings.Split(strings.TrimSpace(privPEM), "\n")[1:2], "")
	fx := newSigned(t, exporter.AuditConfig{Checkpoint: exporter.CheckpointConfig{EveryLines: 2}}, key)
	writeQueries(t, fx, 5)
	fx.audit.Close()
	var logs bytes.Buffer
	slog.New(slog.NewJSONHandler(&logs, nil)).Info("x", "key", key)
	j, _ := json.Marshal(struct{ K exporter.CheckpointKey }{key})
	printed := fmt.Sprintf("%v %+v %#v %s %q %x", key, key, key, key, key, key) + string(j) + logs.String()
	_, err := exporter.ParseCheckpointKey(strings.Replace(privPEM, "PRIVATE KEY", "PRIVATE KEX", -1))
	_, err2 := exporter.ParseCheckpointKey(base64.StdEncoding.EncodeToString([]byte("short")) + block)
	for name, s := range map[string]string{
		"audit file": string(mustRead(t, fx.path)), "log": fx.logs.String(), "prints": printed,
		"errors": fmt.Sprint(err, err2),
	} {
		if strings.Contains(s, block) {
			t.Errorf("the private key is in the %s", name)
		}
	}
	if err == nil || err2 == nil {
		t.Fatal("bad keys parsed")
	}
	// The seed form of the same key is accepted.
	k, err := exporter.ParseCheckpointKey(base64.StdEncoding.EncodeToString(make([]byte, 32)))
	if err != nil || k.KeyID() == "" {
		t.Fatalf("seed form: %v", err)
	}
}

func TestCheckpointAnchorRoundTrip(t *testing.T) {
	key, pub, _ := testKey(t)
	fx := newSigned(t, exporter.AuditConfig{}, key)
	writeQueries(t, fx, 1)
	fx.audit.Close()
	a := logAnchors(t, fx.logs.String())
	if len(a) != 1 || !a[0].VerifySignature(pub) {
		t.Fatalf("anchor %+v", a)
	}
	b, err := exporter.ParseAnchor(a[0].Anchor())
	if err != nil || b.Anchor() != a[0].Anchor() || !b.VerifySignature(pub) {
		t.Fatalf("round trip: %v", err)
	}
	for _, bad := range []string{"", "cp1.1.2.3.4.5", "cp2" + a[0].Anchor()[3:], a[0].Anchor() + ".x"} {
		if _, err := exporter.ParseAnchor(bad); err == nil {
			t.Errorf("ParseAnchor(%q) accepted", bad)
		}
	}
	// An altered anchor does not verify.
	b.HeadSeq++
	if b.VerifySignature(pub) {
		t.Fatal("altered anchor verifies")
	}
}

func TestCheckpointConfigValidate(t *testing.T) {
	err := exporter.AuditConfig{Path: "/x", Checkpoint: exporter.CheckpointConfig{EveryLines: -1, Every: time.Millisecond,
		Key: &exporter.CheckpointKeyRef{Backend: "s3"}}}.Validate()
	for _, want := range []string{"audit.checkpoint.every_lines", "audit.checkpoint.every:", "audit.checkpoint.key.backend", "audit.checkpoint.key.upstream", "audit.checkpoint.key.role"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Validate error %v does not name %s", err, want)
		}
	}
}

// BenchmarkAuditCheckpoint is BenchmarkAuditQuery (a statement: its query
// line and its result line, durability write) without checkpoints and with
// them every 1000 lines (the default), 100 and 1 (the cost of one checkpoint).
func BenchmarkAuditCheckpoint(b *testing.B) {
	key, _, _ := testKey(b)
	for _, every := range []int{0, 1000, 100, 1} {
		b.Run(fmt.Sprintf("every_lines=%d", every), func(b *testing.B) {
			cfg := exporter.AuditConfig{Path: filepath.Join(b.TempDir(), "audit.jsonl"), Parameters: exporter.ParamsFull, MaxSize: 1 << 40,
				Checkpoint: exporter.CheckpointConfig{EveryLines: every, Every: time.Hour}}
			var fx *fixture
			if every == 0 {
				fx = newFixtureLevel(b, cfg, slog.LevelInfo)
			} else {
				fx = newSigned(b, cfg, key)
			}
			s := testSession()
			q := &broker.QueryEvent{Index: 1, Extended: true,
				Text:   "SELECT id, total, created_at FROM orders WHERE customer_id = $1 AND status = $2",
				Params: []broker.Param{{OID: 20, Format: 1, Value: []byte{0, 0, 0, 0, 0, 0, 0x30, 0x39}}, {OID: 25, Value: []byte("open")}}}
			ctx := context.Background()
			if err := fx.obs.SessionStart(ctx, s); err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				q.Index = int64(i + 1)
				if err := fx.obs.Query(ctx, s, q); err != nil {
					b.Fatal(err)
				}
				q.Success, q.Rows = true, 1
				fx.obs.QueryDone(ctx, s, q)
			}
			b.StopTimer()
			fx.audit.Close()
			fx.logs.Reset()
		})
	}
}
