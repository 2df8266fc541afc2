package exporter_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/pgward/pgward/broker"
	"github.com/pgward/pgward/exporter"
)

type fixture struct {
	obs   *exporter.Observer
	audit *exporter.Audit
	reg   *prometheus.Registry
	m     *exporter.Metrics
	logs  *bytes.Buffer
	path  string
}

func newFixture(t testing.TB, cfg exporter.AuditConfig) *fixture {
	return newFixtureLevel(t, cfg, slog.LevelDebug)
}

func newFixtureLevel(t testing.TB, cfg exporter.AuditConfig, level slog.Level) *fixture {
	t.Helper()
	if cfg.Path == "" {
		cfg.Path = filepath.Join(t.TempDir(), "audit.jsonl")
	}
	reg := prometheus.NewRegistry()
	m := exporter.NewMetrics(reg)
	logs := &bytes.Buffer{}
	log := slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: level}))
	a, err := exporter.OpenAudit(cfg, m, log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	return &fixture{obs: exporter.NewObserver(log, m, a), audit: a, reg: reg, m: m, logs: logs, path: cfg.Path}
}

func testSession() *broker.SessionInfo {
	return &broker.SessionInfo{
		RequestID: "4bf92f3577b34da6a3ce929d0e0e4736",
		SessionID: "8d5e7c1e-7a43-4a3b-9f55-0d2b1d0c2a11",
		Protocol:  "postgres",
		Upstream:  "orders", Database: "orders", URI: "db.internal:5432", User: "orders_rw",
		Principal: "billing",
		Identity: broker.Identity{
			PID: 4242, UID: 1001, GID: 1001, User: "billing", Exe: "/usr/bin/psql", Comm: "psql",
			Cgroup: "/system.slice/billing.service", SystemdUnit: "billing.service",
			Attested: true, CgroupID: 7711, StartTime: 123456789, NSPID: 4242, Pinned: true,
		},
		ApplicationName: "psql",
		Start:           time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC),
		Success:         true,
	}
}

// readLines parses every line of the audit file.
func readLines(t testing.TB, path string) []map[string]any {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []map[string]any
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var v map[string]any
		if err := json.Unmarshal(sc.Bytes(), &v); err != nil {
			t.Fatalf("line %d: %v: %s", len(out)+1, err, sc.Bytes())
		}
		out = append(out, v)
	}
	return out
}

func verifyFile(t testing.TB, path string) int {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	n, err := exporter.Verify(f)
	if err != nil {
		t.Fatalf("Verify(%s) after %d lines: %v", path, n, err)
	}
	return n
}

func TestAuditSessionLifecycle(t *testing.T) {
	fx := newFixture(t, exporter.AuditConfig{Parameters: exporter.ParamsFull})
	ctx := context.Background()
	s := testSession()
	if err := fx.obs.SessionStart(ctx, s); err != nil {
		t.Fatal(err)
	}
	q1 := &broker.QueryEvent{Index: 1, Text: "SELECT * FROM orders WHERE id = $1", Extended: true,
		Params: []broker.Param{{OID: 23, Value: []byte("7")}}}
	q2 := &broker.QueryEvent{Index: 2, Text: "ALTER ROLE orders_rw PASSWORD 'hunter2'"}
	for _, q := range []*broker.QueryEvent{q1, q2} {
		if err := fx.obs.Query(ctx, s, q); err != nil {
			t.Fatal(err)
		}
	}
	// Results arrive in order; the second failed.
	q1.Rows, q1.Tag, q1.Success, q1.Duration = 1, "SELECT 1", true, 1500*time.Microsecond
	fx.obs.QueryDone(ctx, s, q1)
	q2.Rows, q2.Success, q2.Code, q2.Error = -1, false, "42501", "permission denied to alter role"
	fx.obs.QueryDone(ctx, s, q2)
	fx.obs.SessionCancel(ctx, &broker.CancelEvent{RequestID: "c1", Caller: s.Identity, Forwarded: true, Session: s})
	s.End, s.EndReason, s.BytesIn, s.BytesOut, s.Queries = s.Start.Add(time.Minute), "client_closed", 100, 2000, 2
	fx.obs.SessionEnd(ctx, s)
	if err := fx.obs.DirectConnect(ctx, exporter.DirectConnectEvent{Process: broker.Identity{PID: 99, UID: 0, Comm: "psql"},
		Dest: "db.internal:5432", Upstream: "orders", Blocked: true}); err != nil {
		t.Fatal(err)
	}

	lines := readLines(t, fx.path)
	want := []struct {
		event, code string
		ei          float64
	}{
		{"db.session.start", "PGW00I", 1},
		{"db.session.query", "PGW02I", 2},
		{"db.session.query", "PGW02I", 3},
		{"db.session.query.result", "PGW03I", 4},
		{"db.session.query.result", "PGW03W", 5},
		{"db.session.cancel", "PGW04I", 6},
		{"db.session.end", "PGW01I", 7},
		{"db.connect.direct", "PGW06W", 0},
	}
	if len(lines) != len(want) {
		t.Fatalf("%d lines, want %d", len(lines), len(want))
	}
	common := []string{"event", "code", "time", "uid", "sid", "ei", "request_id", "seq", "prev_hash",
		"db_protocol", "db_service", "db_uri", "db_name", "db_user", "principal", "process", "success"}
	uids := map[any]bool{}
	for i, w := range want {
		l := lines[i]
		if l["event"] != w.event || l["code"] != w.code || l["ei"] != w.ei || l["seq"] != float64(i+1) {
			t.Errorf("line %d: event %v code %v ei %v seq %v; want %s %s %v %d", i+1, l["event"], l["code"], l["ei"], l["seq"], w.event, w.code, w.ei, i+1)
		}
		for _, k := range common {
			if _, ok := l[k]; !ok {
				t.Errorf("line %d (%s) lacks %q", i+1, w.event, k)
			}
		}
		if _, err := time.Parse(time.RFC3339Nano, l["time"].(string)); err != nil || !strings.HasSuffix(l["time"].(string), "Z") {
			t.Errorf("line %d: time %v is not RFC 3339 UTC", i+1, l["time"])
		}
		uids[l["uid"]] = true
	}
	if len(uids) != len(want) {
		t.Errorf("event uids are not unique: %v", uids)
	}
	check := func(line int, key string, want any) {
		t.Helper()
		got, _ := json.Marshal(lines[line-1][key])
		w, _ := json.Marshal(want)
		if string(got) != string(w) {
			t.Errorf("line %d %s = %s, want %s", line, key, got, w)
		}
	}
	check(1, "db_service", "orders")
	check(1, "request_id", s.RequestID)
	check(1, "process", map[string]any{"pid": 4242, "uid": 1001, "gid": 1001, "user": "billing", "comm": "psql",
		"exe": "/usr/bin/psql", "cgroup": "/system.slice/billing.service", "systemd_unit": "billing.service",
		"container_id": "", "start_time": 123456789, "cgroup_id": 7711, "ns_pid": 4242, "attested": true, "pinned": true})
	check(2, "db_query", q1.Text)
	check(2, "db_query_parameters", []any{map[string]any{"oid": 23, "type": "int4", "format": "text", "value": "7"}})
	check(3, "db_query", "ALTER ROLE orders_rw PASSWORD '[REDACTED]'")
	check(4, "rows", 1)
	check(4, "query_ei", 2)
	check(4, "duration_ms", 1.5)
	check(5, "query_ei", 3)
	check(5, "sqlstate", "42501")
	check(5, "success", false)
	check(7, "reason", "client_closed")
	check(7, "bytes_in", 100)
	check(7, "queries", 2)
	check(8, "blocked", true)
	check(8, "db_uri", "db.internal:5432")
	if n := verifyFile(t, fx.path); n != len(want) {
		t.Errorf("Verify = %d lines, want %d", n, len(want))
	}
	if got := metricValue(t, fx.reg, "pgward_audit_events_total", "event", exporter.EventQuery); got != 2 {
		t.Errorf("audit_events_total{event=db.session.query} = %v, want 2", got)
	}
	if bytes.Contains(mustRead(t, fx.path), []byte("hunter2")) {
		t.Error("password literal reached the audit file")
	}
}

func mustRead(t testing.TB, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestAuditDeniedSession(t *testing.T) {
	fx := newFixture(t, exporter.AuditConfig{})
	s := testSession()
	s.Success, s.Code, s.Error = false, "28000", `pgward: uid 1001 (billing) holds no grant for role "orders_admin" on "orders"`
	s.User = "orders_admin"
	if err := fx.obs.SessionStart(context.Background(), s); err != nil {
		t.Fatal(err)
	}
	l := readLines(t, fx.path)
	if len(l) != 1 || l[0]["code"] != "PGW00W" || l[0]["success"] != false || l[0]["error"] != s.Error || l[0]["sqlstate"] != "28000" {
		t.Fatalf("denied start = %v", l)
	}
	if got := metricValue(t, fx.reg, "pgward_sessions_active"); got != 0 {
		t.Errorf("sessions_active = %v after a denial", got)
	}
	if !strings.Contains(fx.logs.String(), `"level":"WARN","msg":"authentication refused"`) {
		t.Errorf("no WARN for the denial:\n%s", fx.logs)
	}
}

func TestAuditParameterModes(t *testing.T) {
	params := []broker.Param{
		{OID: 25, Value: []byte("orders_rw")},
		{OID: 25, Value: []byte("hunter2")},
		{OID: 20, Format: 1, Value: []byte{0, 0, 0, 0, 0, 0, 0, 42}},
	}
	tests := []struct {
		mode exporter.ParamMode
		want string // db_query_parameters as JSON; "" = absent
	}{
		{exporter.ParamsFull, `[{"oid":25,"type":"text","format":"text","value":"orders_rw"},{"oid":25,"type":"text","format":"text","value":"[REDACTED]"},{"oid":20,"type":"int8","format":"binary","value":"42"}]`},
		{exporter.ParamsRedacted, `[{"oid":25,"type":"text","format":"text","length":9},{"oid":25,"type":"text","format":"text","value":"[REDACTED]"},{"oid":20,"type":"int8","format":"binary","length":8}]`},
		{exporter.ParamsNone, ``},
	}
	for _, tt := range tests {
		t.Run(string(tt.mode), func(t *testing.T) {
			fx := newFixture(t, exporter.AuditConfig{Parameters: tt.mode})
			s := testSession()
			q := &broker.QueryEvent{Index: 1, Extended: true, Text: "SELECT set_config('role', $1, false); ALTER ROLE x PASSWORD $2; SELECT $3::int8", Params: params}
			if err := fx.obs.Query(context.Background(), s, q); err != nil {
				t.Fatal(err)
			}
			var line struct {
				P json.RawMessage `json:"db_query_parameters"`
			}
			if err := json.Unmarshal(bytes.TrimSpace(mustRead(t, fx.path)), &line); err != nil {
				t.Fatal(err)
			}
			if string(line.P) != tt.want {
				t.Errorf("db_query_parameters = %s\nwant %s", line.P, tt.want)
			}
			if bytes.Contains(mustRead(t, fx.path), []byte("hunter2")) {
				t.Error("bound password reached the audit file")
			}
		})
	}
}

func TestAuditDurabilityModes(t *testing.T) {
	for _, d := range []exporter.Durability{exporter.DurabilityFsync, exporter.DurabilityWrite, exporter.DurabilityAsync} {
		t.Run(string(d), func(t *testing.T) {
			fx := newFixture(t, exporter.AuditConfig{Durability: d})
			s := testSession()
			const n = 200
			for i := 1; i <= n; i++ {
				if err := fx.obs.Query(context.Background(), s, &broker.QueryEvent{Index: int64(i), Text: "SELECT 1"}); err != nil {
					t.Fatal(err)
				}
			}
			if err := fx.audit.Close(); err != nil {
				t.Fatal(err)
			}
			if err := fx.audit.Close(); err != nil {
				t.Fatalf("second Close: %v", err)
			}
			if got := verifyFile(t, fx.path); got != n {
				t.Errorf("%d lines verified, want %d", got, n)
			}
			if d != exporter.DurabilityAsync {
				if err := fx.obs.Query(context.Background(), s, &broker.QueryEvent{Index: n + 1, Text: "SELECT 1"}); !errors.Is(err, exporter.ErrAuditUnavailable) {
					t.Errorf("Query after Close = %v, want ErrAuditUnavailable", err)
				}
			}
		})
	}
}

func TestAuditReopenContinuesChain(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	write := func(n int) {
		a, err := exporter.OpenAudit(exporter.AuditConfig{Path: path}, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		obs := exporter.NewObserver(nil, nil, a)
		for i := range n {
			if err := obs.Query(context.Background(), testSession(), &broker.QueryEvent{Index: int64(i + 1), Text: "SELECT 1"}); err != nil {
				t.Fatal(err)
			}
		}
		if err := a.Close(); err != nil {
			t.Fatal(err)
		}
	}
	write(3)
	write(2)
	if got := verifyFile(t, path); got != 5 {
		t.Fatalf("verified %d, want 5", got)
	}
	// A crash in the middle of a write leaves a partial line: reopening cuts it.
	f, err := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString(`{"event":"db.session.query","co`)
	f.Close()
	if _, err := exporter.Verify(bytes.NewReader(mustRead(t, path))); err == nil {
		t.Fatal("Verify accepted a torn last line")
	}
	write(1)
	if got := verifyFile(t, path); got != 6 {
		t.Fatalf("verified %d after torn tail, want 6", got)
	}
	// A last line that is not an audit event: refuse to continue.
	os.WriteFile(path, []byte("not json\n"), 0o600)
	if _, err := exporter.OpenAudit(exporter.AuditConfig{Path: path}, nil, nil); err == nil || !strings.Contains(err.Error(), "move the file aside") {
		t.Errorf("OpenAudit on a foreign file = %v", err)
	}
}

func TestAuditRotation(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "audit.jsonl")
	fx := newFixture(t, exporter.AuditConfig{Path: path, MaxSize: 4096, MaxFiles: 3})
	s := testSession()
	for i := 1; i <= 100; i++ {
		if err := fx.obs.Query(context.Background(), s, &broker.QueryEvent{Index: int64(i), Text: "SELECT 1"}); err != nil {
			t.Fatal(err)
		}
	}
	fx.audit.Close()
	files, _ := filepath.Glob(path + "*")
	if len(files) != 4 {
		t.Fatalf("files %v, want the active one and 3 rotated", files)
	}
	chain := []string{path + ".3", path + ".2", path + ".1", path}
	total := 0
	for _, f := range chain {
		st, err := os.Stat(f)
		if err != nil {
			t.Fatal(err)
		}
		if st.Size() > 4096 {
			t.Errorf("%s is %d bytes, over max_size", f, st.Size())
		}
		if st.Mode().Perm() != 0o600 {
			t.Errorf("%s mode %v, want 0600", f, st.Mode().Perm())
		}
		total += verifyFile(t, f) // seq restarts at 1 in each file
	}
	n, err := exporter.VerifyFiles(chain...)
	if err != nil || n != total {
		t.Fatalf("VerifyFiles = %d, %v; want %d", n, err, total)
	}
	// Files out of order break the link between them.
	if _, err := exporter.VerifyFiles(path+".2", path+".3"); err == nil {
		t.Error("VerifyFiles accepted files out of order")
	}
	// The first line of the newest file carries the hash of the last line of .1.
	lines := readLines(t, path)
	if lines[0]["seq"] != 1.0 || lines[0]["prev_hash"] == exporter.ZeroHash {
		t.Errorf("first line of rotated-to file: seq %v prev_hash %v", lines[0]["seq"], lines[0]["prev_hash"])
	}
}

func TestVerifyDetects(t *testing.T) {
	fx := newFixture(t, exporter.AuditConfig{})
	s := testSession()
	for i := 1; i <= 5; i++ {
		if err := fx.obs.Query(context.Background(), s, &broker.QueryEvent{Index: int64(i), Text: fmt.Sprintf("SELECT %d", i)}); err != nil {
			t.Fatal(err)
		}
	}
	good := mustRead(t, fx.path)
	lines := strings.SplitAfter(string(good), "\n")[:5]
	tests := []struct {
		name     string
		data     string
		kind     string
		line, ok int
	}{
		{"intact", string(good), "", 0, 5},
		{"edited", lines[0] + lines[1] + strings.Replace(lines[2], "SELECT 3", "SELECT 4", 1) + lines[3] + lines[4], "hash", 4, 3},
		{"removed", lines[0] + lines[1] + lines[3] + lines[4], "seq", 3, 2},
		{"removed first", strings.Join(lines[1:], ""), "seq", 1, 0},
		{"swapped", lines[0] + lines[2] + lines[1] + lines[3] + lines[4], "seq", 2, 1},
		{"truncated", string(good[:len(good)-10]), "truncated", 5, 4},
		{"malformed", lines[0] + "garbage\n" + lines[2], "malformed", 2, 1},
		{"empty", "", "", 0, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n, err := exporter.Verify(strings.NewReader(tt.data))
			if n != tt.ok {
				t.Errorf("n = %d, want %d", n, tt.ok)
			}
			if tt.kind == "" {
				if err != nil {
					t.Fatalf("Verify: %v", err)
				}
				return
			}
			var ce *exporter.ChainError
			if !errors.As(err, &ce) || ce.Kind != tt.kind || ce.Line != tt.line {
				t.Fatalf("err = %v, want %s at line %d", err, tt.kind, tt.line)
			}
		})
	}
}

func TestAuditConfigValidate(t *testing.T) {
	err := exporter.AuditConfig{Durability: "sometimes", Parameters: "all", MaxSize: -1, MaxFiles: -2}.Validate()
	for _, want := range []string{"audit.path", "audit.durability", "audit.parameters", "audit.max_size", "audit.max_files"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Validate error %v does not name %s", err, want)
		}
	}
	if err := (exporter.AuditConfig{Path: "/x"}).Validate(); err != nil {
		t.Errorf("defaults do not validate: %v", err)
	}
}

func BenchmarkAuditQuery(b *testing.B) {
	for _, d := range []exporter.Durability{exporter.DurabilityWrite, exporter.DurabilityAsync} {
		b.Run(string(d), func(b *testing.B) {
			fx := newFixtureLevel(b, exporter.AuditConfig{Durability: d, Parameters: exporter.ParamsFull, MaxSize: 1 << 40}, slog.LevelInfo)
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
		})
	}
}

// exampleEvents writes one event of every code; docs/audit-events.md shows
// their lines, and TestAuditDocExamples keeps the two in step.
func exampleEvents(t testing.TB, fx *fixture) {
	t.Helper()
	ctx := context.Background()
	s := testSession()
	s.Identity.Pod = &broker.Pod{Namespace: "billing", Name: "billing-7c9f-x2x", ServiceAccount: "billing", Labels: map[string]string{"app": "billing"}}
	s.Identity.ContainerID = "3f2a9c0e5b1d"
	denied := *s
	denied.SessionID, denied.RequestID, denied.User = "1c0de8f2-3b0e-4c43-8d36-5d6b1f7e9a20", "0af7651916cd43dd8448eb211c80319c", "orders_admin"
	denied.Success, denied.Code, denied.Error = false, "28000", `pgward: uid 1001 (billing) holds no grant for role "orders_admin" on upstream "orders"`
	if err := fx.obs.SessionStart(ctx, &denied); err != nil {
		t.Fatal(err)
	}
	if err := fx.obs.SessionStart(ctx, s); err != nil {
		t.Fatal(err)
	}
	q1 := &broker.QueryEvent{Index: 1, Extended: true, Text: "SELECT id, total FROM orders WHERE customer_id = $1 AND status = $2",
		Params: []broker.Param{{OID: 20, Format: 1, Value: []byte{0, 0, 0, 0, 0, 0, 0x30, 0x39}}, {OID: 25, Value: []byte("open")}}}
	if err := fx.obs.Query(ctx, s, q1); err != nil {
		t.Fatal(err)
	}
	q1.Success, q1.Rows, q1.Tag, q1.Duration = true, 3, "SELECT 3", 1234*time.Microsecond
	fx.obs.QueryDone(ctx, s, q1)
	q2 := &broker.QueryEvent{Index: 2, Text: "ALTER ROLE orders_rw PASSWORD 'hunter2'"}
	if err := fx.obs.Query(ctx, s, q2); err != nil {
		t.Fatal(err)
	}
	q2.Success, q2.Rows, q2.Code, q2.Error, q2.Duration = false, -1, "42501", "permission denied to alter role", 310*time.Microsecond
	fx.obs.QueryDone(ctx, s, q2)
	fx.obs.SessionCancel(ctx, &broker.CancelEvent{RequestID: "5b8aa5a2d2c872e8321cf37308d69df2", Caller: s.Identity, Forwarded: true, Session: s})
	intruder := broker.Identity{PID: 6666, UID: 1002, GID: 1002, User: "mallory", Exe: "/usr/bin/python3", Comm: "python3",
		Cgroup: "/user.slice/user-1002.slice/session-4.scope", Attested: true, CgroupID: 9120, StartTime: 99887766, NSPID: 6666}
	fx.obs.Cancel(ctx, &broker.CancelEvent{RequestID: "9f3c1a7e0b2d4c5e8f6a7b8c9d0e1f2a", Caller: intruder, Reason: "unknown_key"})
	s.End, s.EndReason, s.BytesIn, s.BytesOut, s.Queries = s.Start.Add(42*time.Second), "client_closed", 412, 1873, 2
	fx.obs.SessionEnd(ctx, s)
	if err := fx.obs.DirectConnect(ctx, exporter.DirectConnectEvent{Time: s.End, Process: intruder, Dest: "10.0.0.5:5432", Upstream: "orders"}); err != nil {
		t.Fatal(err)
	}
	if err := fx.obs.DirectConnect(ctx, exporter.DirectConnectEvent{Time: s.End, Process: intruder, Dest: "10.0.0.5:5432", Upstream: "orders", Blocked: true}); err != nil {
		t.Fatal(err)
	}
}

// TestAuditDocExamples checks docs/audit-events.md: its example lines form
// one valid chain, and each has exactly the fields the encoder writes today
// for an event of the same code.
func TestAuditDocExamples(t *testing.T) {
	doc := string(mustRead(t, filepath.Join("..", "docs", "audit-events.md")))
	var examples []string
	for _, block := range strings.Split(doc, "```json\n")[1:] {
		line, _, _ := strings.Cut(block, "\n```")
		examples = append(examples, line)
	}
	if len(examples) < 11 {
		t.Fatalf("%d examples in docs/audit-events.md, want one per code", len(examples))
	}
	n, err := exporter.Verify(strings.NewReader(strings.Join(examples, "\n") + "\n"))
	if err != nil || n != len(examples) {
		t.Fatalf("doc examples do not verify as one chain: %d, %v", n, err)
	}

	key, _, _ := testKey(t)
	fx := newSigned(t, exporter.AuditConfig{Parameters: exporter.ParamsFull}, key)
	exampleEvents(t, fx)
	adminEvents(t, fx, testSession())
	fx.audit.Close() // the shutdown checkpoint
	keys := func(m map[string]any) string {
		var ks []string
		for k, v := range m {
			ks = append(ks, k)
			if p, ok := v.(map[string]any); ok {
				for pk := range p {
					ks = append(ks, k+"."+pk)
				}
			}
		}
		slices.Sort(ks)
		return strings.Join(ks, " ")
	}
	want := map[string][]string{} // code → the field sets written (a simple and an extended query differ)
	for _, l := range readLines(t, fx.path) {
		want[l["code"].(string)] = append(want[l["code"].(string)], keys(l))
	}
	seen := map[string]bool{}
	for _, ex := range examples {
		var m map[string]any
		if err := json.Unmarshal([]byte(ex), &m); err != nil {
			t.Fatal(err)
		}
		code := m["code"].(string)
		seen[code] = true
		if got := keys(m); !slices.Contains(want[code], got) {
			t.Errorf("doc example %s has fields\n%s\nthe encoder writes one of\n%s", code, got, strings.Join(want[code], "\n"))
		}
	}
	for _, code := range []string{exporter.CodeSessionStart, exporter.CodeSessionDenied, exporter.CodeSessionEnd,
		exporter.CodeQuery, exporter.CodeQueryResult, exporter.CodeQueryResultError, exporter.CodeCancel,
		exporter.CodeCancelRejected, exporter.CodeDirectConnect, exporter.CodeDirectConnectBlock, exporter.CodeCheckpoint,
		exporter.CodeAdminSessionsList, exporter.CodeAdminSessionsListDenied, exporter.CodeAdminSessionsEnd, exporter.CodeAdminSessionsEndFailed} {
		if !seen[code] {
			t.Errorf("no example of %s in docs/audit-events.md", code)
		}
		if !strings.Contains(doc, "`"+code+"`") {
			t.Errorf("code %s not in the code table", code)
		}
	}
}

// A statement that mentions a password and fails with a syntax error or a
// data exception keeps its SQLSTATE, not the server's message: those quote
// the token they stopped at, which can be part of the password. Other
// failures keep their message.
func TestAuditPasswordStatementErrorNotRecorded(t *testing.T) {
	fx := newFixture(t, exporter.AuditConfig{})
	ctx := context.Background()
	s := testSession()
	if err := fx.obs.SessionStart(ctx, s); err != nil {
		t.Fatal(err)
	}
	qs := []*broker.QueryEvent{
		{Index: 1, Text: "ALTER ROLE r PASSWORD 'OneLineQa' 'OneLineZb'"},
		{Index: 2, Text: "SELECT 1/0"},
		{Index: 3, Text: "ALTER ROLE postgres PASSWORD 'OneLineXy'"},
	}
	for _, q := range qs {
		if err := fx.obs.Query(ctx, s, q); err != nil {
			t.Fatal(err)
		}
	}
	qs[0].Success, qs[0].Code, qs[0].Error = false, "42601", `syntax error at or near "'OneLineZb'"`
	qs[1].Success, qs[1].Code, qs[1].Error = false, "22012", "division by zero"
	qs[2].Success, qs[2].Code, qs[2].Error = false, "42501", "permission denied to alter role"
	for _, q := range qs {
		fx.obs.QueryDone(ctx, s, q)
	}
	fx.obs.SessionEnd(ctx, s)
	if raw := string(mustRead(t, fx.path)); strings.Contains(raw, "OneLine") {
		t.Fatalf("the password reached the audit file:\n%s", raw)
	}
	got := map[string]any{}
	for _, l := range readLines(t, fx.path) {
		if l["event"] == "db.session.query.result" {
			got[l["sqlstate"].(string)] = l["error"]
		}
	}
	if got["42601"] == nil || got["42601"] == qs[0].Error || got["22012"] != "division by zero" || got["42501"] != qs[2].Error {
		t.Errorf("result errors by SQLSTATE: %v", got)
	}
}
