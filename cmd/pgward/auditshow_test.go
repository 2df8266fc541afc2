package main

import (
	"compress/gzip"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pgward/pgward/broker"
	"github.com/pgward/pgward/exporter"
)

// auditWriter writes real audit events (the exporter's own sink) for
// sessions of several principals.
type auditWriter struct {
	audit *exporter.Audit
	obs   *exporter.Observer
	sess  map[string]*broker.SessionInfo
	so    map[string]broker.SessionObserver
	n     map[string]int64
}

func newAuditWriter(t testing.TB, path string, maxSize int64) *auditWriter {
	t.Helper()
	a, err := exporter.OpenAudit(exporter.AuditConfig{Path: path, MaxSize: maxSize, MaxFiles: 50}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	return &auditWriter{audit: a, obs: exporter.NewObserver(nil, nil, a), sess: map[string]*broker.SessionInfo{}, so: map[string]broker.SessionObserver{}, n: map[string]int64{}}
}

// statement writes one statement (query and result) of principal's session.
func (w *auditWriter) statement(t testing.TB, principal, sql string) {
	t.Helper()
	ctx := context.Background()
	s := w.sess[principal]
	if s == nil {
		uid := uint32(1000 + len(w.sess))
		s = &broker.SessionInfo{SessionID: fmt.Sprintf("sid-%s", principal), RequestID: fmt.Sprintf("req-%s", principal), Protocol: "postgres",
			Upstream: "orders", Database: "orders", User: principal + "_rw", Principal: principal, Success: true, Start: time.Now(),
			Identity: broker.Identity{PID: int32(4000 + len(w.sess)), UID: uid, User: principal, Exe: "/usr/bin/" + principal, Comm: principal}}
		w.sess[principal] = s
		rctx, req := w.obs.Begin(ctx, &broker.Request{RequestID: s.RequestID, Start: s.Start})
		so, err := req.Started(rctx, &broker.AuthRequest{RequestID: s.RequestID}, s)
		if err != nil {
			t.Fatal(err)
		}
		w.so[principal] = so
	}
	w.n[principal]++
	q := &broker.QueryEvent{Index: w.n[principal], Text: sql, Start: time.Now(), Rows: -1}
	if err := w.so[principal].Statements(ctx, []*broker.QueryEvent{q}); err != nil {
		t.Fatal(err)
	}
	q.Success, q.Tag, q.Rows, q.Duration = true, "SELECT 1", 1, time.Millisecond
	w.so[principal].Result(ctx, q)
}

func (w *auditWriter) flush(t testing.TB) {
	if err := w.audit.Flush(); err != nil {
		t.Fatal(err)
	}
}

// TestAuditShowFilters: in a file of thousands of lines from three
// principals, --principal X --since 1m lists exactly X's statements (as
// JSON and as human lines); the other filters narrow as they say; the
// chain is reported verified, and a line edited in the middle is reported
// with exit 3.
func TestAuditShowFilters(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "audit.jsonl")
	w := newAuditWriter(t, path, 0)
	principals := []string{"billing", "reports", "billingx"} // billingx: a prefix must not match
	for i := range 1500 {
		p := principals[i%3]
		w.statement(t, p, fmt.Sprintf("select %d /* %s */", i, p))
	}
	w.flush(t)
	code, out, errs := runCLI("audit", "show", "--principal", "billing", "--since", "1m", "--event", "db.session.query", "--json", path)
	if code != exitOK {
		t.Fatalf("audit show: %d %s", code, errs)
	}
	lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
	if len(lines) != 500 {
		t.Fatalf("%d lines for billing's statements, want 500", len(lines))
	}
	for i, l := range lines {
		var ev map[string]any
		if err := json.Unmarshal([]byte(l), &ev); err != nil {
			t.Fatal(err)
		}
		if ev["principal"] != "billing" || ev["event"] != "db.session.query" || ev["db_query"] != fmt.Sprintf("select %d /* billing */", 3*i) {
			t.Fatalf("line %d: %s", i, l)
		}
	}
	if !strings.Contains(errs, "500 of 3003 events shown from 1 file(s); hash chain verified") {
		t.Errorf("summary: %s", errs)
	}
	// Human lines: time, principal, process, role@upstream, statement.
	code, out, _ = runCLI("audit", "show", "--principal", "billing", "--since", "1m", path)
	human := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
	if code != exitOK || len(human) != 1+500+500 { // start, queries, results
		t.Fatalf("human: %d, %d lines", code, len(human))
	}
	if !strings.Contains(human[1], "  billing  billing[4000] uid 1000  billing_rw@orders  query #1: select 0 /* billing */") ||
		!strings.Contains(human[2], "result #1: ok SELECT 1 (1.0 ms)") {
		t.Errorf("human lines:\n%s\n%s", human[1], human[2])
	}
	// --since in the future, --until in the past: nothing.
	if _, out, _ := runCLI("audit", "show", "--since", time.Now().Add(time.Hour).Format(time.RFC3339), path); out != "" {
		t.Errorf("--since in an hour showed %d bytes", len(out))
	}
	if _, out, _ := runCLI("audit", "show", "--until", "1h", path); out != "" {
		t.Errorf("--until an hour ago showed %d bytes", len(out))
	}
	for _, tc := range []struct {
		args []string
		want int
	}{
		{[]string{"--uid", "1001"}, 1001}, // reports: start + 500 × 2
		{[]string{"--pid", "4002", "--event", "db.session.query.result"}, 500},
		{[]string{"--sid", "sid-billingx", "--event", "db.session.start,db.session.query"}, 501},
		{[]string{"--request-id", "req-reports", "--event", "db.session.start"}, 1},
		{[]string{"--failed"}, 0},
	} {
		code, out, errs := runCLI(append(append([]string{"audit", "show", "--json"}, tc.args...), path)...)
		if n := strings.Count(out, "\n"); code != exitOK || n != tc.want {
			t.Errorf("%v: %d lines (exit %d %s), want %d", tc.args, n, code, errs, tc.want)
		}
	}

	// An edit in the middle: shown, and said.
	data, _ := os.ReadFile(path)
	edited := strings.Replace(string(data), "select 701 /* billingx */", "select 799 /* billingx */", 1)
	bad := filepath.Join(dir, "edited.jsonl")
	os.WriteFile(bad, []byte(edited), 0o600)
	code, _, errs = runCLI("audit", "show", "--principal", "reports", bad)
	if code != exitBadInput || !strings.Contains(errs, "does not verify at "+bad+":") || !strings.Contains(errs, "hash chain does NOT verify at 1 place(s)") {
		t.Errorf("edited file: %d %s", code, errs)
	}

	// Bad input.
	for _, args := range [][]string{
		{"audit", "show", "--nope", path},
		{"audit", "show", "--since", "yesterday", path},
		{"audit", "show", "--uid", "-1", path},
		{"audit", "show", path, path},
	} {
		if code, _, _ := runCLI(args...); code != exitUsage {
			t.Errorf("%v: exit %d, want %d", args, code, exitUsage)
		}
	}
	if code, _, errs := runCLI("audit", "show", filepath.Join(dir, "nodir", "audit.jsonl")); code != exitFailure {
		t.Errorf("missing directory: exit %d %s", code, errs)
	}
}

// TestAuditShowRotated: rotated files (one of them compressed, as
// logrotate leaves them) are read oldest first with the active one, and
// their chain links are checked across files.
func TestAuditShowRotated(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "audit.jsonl")
	w := newAuditWriter(t, path, 64<<10)
	for i := range 1200 {
		w.statement(t, "billing", fmt.Sprintf("select %d", i))
	}
	w.flush(t)
	files, err := exporter.AuditFiles(path)
	if err != nil || len(files) < 4 {
		t.Fatalf("rotated files: %v %v", files, err)
	}
	// Compress the second oldest.
	gz := files[1]
	data, _ := os.ReadFile(gz)
	f, _ := os.Create(gz + ".gz")
	zw := gzip.NewWriter(f)
	zw.Write(data)
	zw.Close()
	f.Close()
	os.Remove(gz)

	code, out, errs := runCLI("audit", "show", "--json", "--event", "db.session.query", path)
	if code != exitOK || strings.Count(out, "\n") != 1200 || !strings.Contains(errs, "hash chain verified") {
		t.Fatalf("rotated: exit %d, %d lines, %s", code, strings.Count(out, "\n"), errs)
	}
	for i, l := range strings.Split(strings.TrimSuffix(out, "\n"), "\n") {
		if !strings.Contains(l, fmt.Sprintf(`"db_query":"select %d"`, i)) {
			t.Fatalf("line %d out of order: %s", i, l)
		}
	}
	// A rotated file missing in the middle breaks the link.
	os.Remove(files[2])
	if code, _, errs := runCLI("audit", "show", "--event", "db.session.query", path); code != exitBadInput || !strings.Contains(errs, ": link: ") {
		t.Errorf("a missing rotated file: %d %s", code, errs)
	}
}

// TestAuditShowFollow: -f shows a statement written after it started,
// across a rotation too (polling every 200 ms; the test waits up to 5 s).
func TestAuditShowFollow(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "audit.jsonl")
	w := newAuditWriter(t, path, 32<<10)
	w.statement(t, "billing", "select 'before'")
	w.flush(t)
	var out, errs lockedBuffer
	stop := make(chan struct{})
	done := make(chan int, 1)
	go func() {
		done <- auditShow([]string{"-f", "--principal", "billing", "--event", "db.session.query", path}, &out, &errs, stop)
	}()
	waitFor(t, 5*time.Second, func() bool { return strings.Contains(out.String(), "select 'before'") }, out.String)

	start := time.Now()
	w.statement(t, "billing", "select 'after'")
	w.flush(t)
	waitFor(t, 5*time.Second, func() bool { return strings.Contains(out.String(), "select 'after'") }, out.String)
	t.Logf("a new statement was shown after %s", time.Since(start))

	// Past a rotation (32 KiB files): every statement shows, in order.
	for i := range 300 {
		w.statement(t, "billing", fmt.Sprintf("select 'rotated %d'", i))
	}
	w.flush(t)
	if _, err := os.Stat(path + ".1"); err != nil {
		t.Fatalf("no rotation happened: %v", err)
	}
	waitFor(t, 5*time.Second, func() bool { return strings.Contains(out.String(), "select 'rotated 299'") }, out.String)
	close(stop)
	if code := <-done; code != exitOK {
		t.Errorf("follow exit %d: %s", code, errs.String())
	}
	got := out.String()
	if n := strings.Count(got, "query #"); n != 302 || strings.Index(got, "'rotated 10'") > strings.Index(got, "'rotated 11'") {
		t.Errorf("%d statements followed, want 302; errors: %s", n, errs.String())
	}
	if strings.Contains(errs.String(), "does not verify") {
		t.Errorf("following across the rotation broke the chain: %s", errs.String())
	}
}

// BenchmarkAuditShowPrincipal: `audit show --principal X --since 1m` over
// a file of 100,000 lines from four principals (a quarter of them X's),
// human output, chain checked. One op is the whole file.
func BenchmarkAuditShowPrincipal(b *testing.B) {
	dir := b.TempDir()
	path := filepath.Join(dir, "audit.jsonl")
	w := newAuditWriter(b, path, 1<<30)
	principals := []string{"billing", "reports", "etl", "web"}
	lines := 0
	for i := 0; lines < 100_000; i++ {
		w.statement(b, principals[i%4], fmt.Sprintf("select id, total, customer_id from orders where id = %d and status = 'open' order by created_at desc limit 10", i))
		lines += 2
	}
	w.flush(b)
	fi, _ := os.Stat(path)
	b.SetBytes(fi.Size())
	b.ResetTimer()
	for b.Loop() {
		if code := auditShow([]string{"--principal", "billing", "--since", "1m", path}, io.Discard, io.Discard, nil); code != exitOK {
			b.Fatalf("exit %d", code)
		}
	}
	b.ReportMetric(float64(lines), "lines/op")
}
