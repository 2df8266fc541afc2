package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgward/pgward/broker"
	"github.com/pgward/pgward/exporter"
	"github.com/pgward/pgward/exporter/otlptest"
	"github.com/pgward/pgward/testenv"
)

// One security engineer's question: given a request_id, find the whole
// story — log lines, audit events, counters, trace.
func TestObservabilityEndToEnd(t *testing.T) {
	rcv := otlptest.NewGRPC(t)
	env := map[string]string{
		"OTEL_EXPORTER_OTLP_ENDPOINT": rcv.Endpoint(),
		"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
		"OTEL_TRACES_SAMPLER":         "always_on",
	}
	tp, shutdownTP, err := exporter.NewTracerProvider(context.Background(), func(k string) string { return env[k] })
	if err != nil {
		t.Fatal(err)
	}
	h := newHarness(t, func(h *harness, c *Config) { h.tp = tp })
	ctx := context.Background()
	before := scrapeAll(t, h)

	// Allowed session: simple, extended with parameters, a failing
	// statement, COPY, and a cancelled statement.
	c := h.connect(t, testenv.ScramUser, "orders", "application_name=obs-test")
	if _, err := c.Exec(ctx, "create temp table obs (id int, note text)"); err != nil {
		t.Fatal(err)
	}
	var n int
	var note string
	if err := c.QueryRow(ctx, "select $1::int + 1, $2::text", 41, "hello").Scan(&n, &note); err != nil || n != 42 {
		t.Fatalf("extended: %d %v", n, err)
	}
	if _, err := c.Exec(ctx, "select 1/0", pgx.QueryExecModeSimpleProtocol); err == nil {
		t.Fatal("1/0 succeeded")
	}
	if _, err := c.PgConn().CopyFrom(ctx, strings.NewReader("1\ta\n2\tb\n3\tc\n"), "copy obs from stdin"); err != nil {
		t.Fatal(err)
	}
	// The backend's pid from the server (a query on c would be audited).
	admin, err := h.pg.Admin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var backend uint32
	if err := admin.QueryRow(ctx, "select pid from pg_stat_activity where starts_with(application_name, 'obs-test')").Scan(&backend); err != nil {
		t.Fatalf("the session's backend: %v", err)
	}
	admin.Close(ctx)
	go func() {
		if err := h.pg.CancelWhenRunning(c, backend, "select pg_sleep(10)"); err != nil {
			t.Errorf("cancel request: %v", err)
		}
	}()
	if _, err := c.Exec(ctx, "select pg_sleep(10)"); err == nil {
		t.Fatal("pg_sleep not cancelled")
	}
	pid := c.PgConn().PID()
	c.Close(ctx)

	// Refused: no grant; claimed principal that does not match.
	connectErr(t, h.dsn("postgres", "orders"))
	connectErr(t, h.dsn(testenv.ScramUser, "orders", "options='-c pgward.principal=stranger'"))

	// Audit: find the allowed session by its backend pid's cancel and start.
	var rid, sid string
	findEvent(t, h, "db.session.end", func(ev map[string]any) bool {
		if ev["db_user"] == testenv.ScramUser && ev["success"] == true {
			rid, sid = asString(ev["request_id"]), asString(ev["sid"])
			return true
		}
		return false
	})
	if len(rid) != 32 {
		t.Fatalf("request_id %q is not a W3C trace id", rid)
	}
	var events []map[string]any
	for _, ev := range h.auditEvents(t) {
		if ev["sid"] == sid {
			events = append(events, ev)
		}
	}
	// Order: start first, end last, every query line in the order sent,
	// each result after its query (results may be written late: they ride
	// along with a later write), ei contiguous, one request_id.
	var queries []map[string]any
	resultOf := map[uint64]map[string]any{}
	seen := map[uint64]bool{}
	for i, ev := range events {
		if ev["request_id"] != rid && ev["event"] != "db.session.cancel" {
			t.Errorf("event %d has request_id %v, want %s", i, ev["request_id"], rid)
		}
		if num(ev["ei"]) != uint64(i+1) {
			t.Errorf("event %d has ei %v", i, ev["ei"])
		}
		switch ev["event"] {
		case "db.session.query":
			queries = append(queries, ev)
			seen[num(ev["ei"])] = true
		case "db.session.query.result":
			q := num(ev["query_ei"])
			if !seen[q] || resultOf[q] != nil {
				t.Fatalf("result %v refers to query ei %d: not an earlier, unanswered query", ev, q)
			}
			resultOf[q] = ev
		}
	}
	if events[0]["event"] != "db.session.start" || events[len(events)-1]["event"] != "db.session.end" {
		t.Fatalf("first %v, last %v", events[0]["event"], events[len(events)-1]["event"])
	}
	var texts []string
	for _, q := range queries {
		texts = append(texts, asString(q["db_query"]))
		if resultOf[num(q["ei"])] == nil {
			t.Fatalf("query %q has no result", q["db_query"])
		}
	}
	wantTexts := []string{"create temp table obs (id int, note text)", "select $1::int + 1, $2::text", "select 1/0", "copy obs from stdin", "select pg_sleep(10)"}
	if strings.Join(texts, "|") != strings.Join(wantTexts, "|") {
		t.Fatalf("queries audited:\n got %q\nwant %q", texts, wantTexts)
	}
	start := events[0]
	if start["principal"] != "me" || start["db_service"] != "orders" || start["db_name"] != testenv.Database || start["success"] != true {
		t.Fatalf("start: %v", start)
	}
	if p := start["process"].(map[string]any); num(p["uid"]) != uint64(os.Getuid()) || num(p["pid"]) != uint64(os.Getpid()) || p["pinned"] != true {
		t.Fatalf("start process: %v", p)
	}
	ext := queries[1]
	params, _ := ext["db_query_parameters"].([]any)
	if ext["extended"] != true || len(params) != 2 {
		t.Fatalf("extended query event: %v", ext)
	}
	p0, p1 := params[0].(map[string]any), params[1].(map[string]any)
	if p0["value"] != "41" || p0["type"] != "int4" || p1["value"] != "hello" || p1["type"] != "text" {
		t.Fatalf("parameters %v", params)
	}
	if r := resultOf[num(queries[1]["ei"])]; num(r["rows"]) != 1 || r["success"] != true {
		t.Fatalf("extended result: %v", r)
	}
	if r := resultOf[num(queries[2]["ei"])]; r["sqlstate"] != "22012" || r["success"] != false {
		t.Fatalf("1/0 result: %v", r)
	}
	if r := resultOf[num(queries[3]["ei"])]; num(r["rows"]) != 3 {
		t.Fatalf("copy result: %v", r)
	}
	if r := resultOf[num(queries[4]["ei"])]; r["sqlstate"] != "57014" {
		t.Fatalf("cancelled statement's result: %v", r)
	}
	var cancelEv map[string]any
	for _, ev := range events {
		if ev["event"] == "db.session.cancel" {
			cancelEv = ev
		}
	}
	if cancelEv["success"] != true {
		t.Fatalf("cancel event: %v", cancelEv)
	}
	if end := events[len(events)-1]; end["reason"] != "client_closed" {
		t.Fatalf("end: %v", end)
	}
	if _, err := exporter.VerifyFiles(h.auditPath); err != nil {
		t.Fatalf("audit chain: %v", err)
	}
	var denials int
	for _, ev := range h.auditEvents(t) {
		if ev["event"] == "db.session.start" && ev["success"] == false {
			denials++
			if ev["error"] == nil || ev["request_id"] == "" {
				t.Fatalf("denial without error or request_id: %v", ev)
			}
		}
	}
	if denials != 2 {
		t.Fatalf("%d denials audited, want 2", denials)
	}

	// Logs: every line of the request carries its id; refusals are WARN.
	var lines int
	for _, l := range strings.Split(h.logs.String(), "\n") {
		if strings.Contains(l, rid) {
			lines++
		}
	}
	if lines < 2 {
		t.Fatalf("%d log lines carry request_id %s", lines, rid)
	}
	if !strings.Contains(h.logs.String(), `"level":"WARN","msg":"authentication refused"`) {
		t.Fatal("refusals not logged at WARN")
	}

	// Counters moved by exactly what happened.
	after := scrapeAll(t, h)
	deltas := map[string]float64{
		"pgward_requests_total":                             3,
		"pgward_responses_total":                            1,
		"pgward_error_responses_total":                      2,
		"pgward_identity_matching_attempts_total":           1,
		"pgward_identity_matching_failures_total":           1,
		"pgward_password_retrieval_unauthorized_total":      1,
		`pgward_auth_failures_total{reason="unauthorized"}`: 1,
		`pgward_auth_failures_total{reason="identity"}`:     1,
		"pgward_sessions_total":                             1,
		`pgward_cancel_requests_total{outcome="forwarded"}`: 1,
		"pgward_queries_total":                              5,
	}
	for k, d := range deltas {
		if got := after[k] - before[k]; got != d {
			t.Errorf("%s moved by %v, want %v", k, got, d)
		}
	}

	// The trace: stop the agent so every span is exported.
	h.stop()
	if err := shutdownTP(context.Background()); err != nil {
		t.Fatal(err)
	}
	spans := rcv.Spans()
	byID := map[string]otlptest.Span{}
	var root otlptest.Span
	for _, s := range spans {
		if s.TraceID != rid {
			continue
		}
		byID[s.SpanID] = s
		if s.Name == "pgward.session" {
			root = s
		}
	}
	if root.SpanID == "" || root.Attributes["pgward.request_id"] != rid {
		t.Fatalf("no pgward.session span with request_id %s among %d spans", rid, len(spans))
	}
	children := map[string][]string{}
	for _, s := range byID {
		if p, ok := byID[s.ParentID]; ok {
			children[p.Name] = append(children[p.Name], s.Name)
		}
	}
	for _, c := range []string{"identity.verify", "credentials.fetch", "upstream.auth"} {
		if !containsStr(children["pgward.auth"], c) {
			t.Errorf("pgward.auth lacks child %s: %v", c, children)
		}
	}
	var stmt otlptest.Span
	for _, s := range byID {
		if s.Attributes["db.query.text"] == "select 1/0" {
			stmt = s
		}
	}
	if stmt.Name != "SELECT" || stmt.Attributes["db.system.name"] != "postgresql" || stmt.Attributes["db.namespace"] != testenv.Database ||
		stmt.Status != "STATUS_CODE_ERROR" || byID[stmt.ParentID].Name != "pgward.session" {
		t.Fatalf("statement span: %+v", stmt)
	}
	_ = pid
}

func containsStr(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// scrapeAll returns every sample of /metrics keyed by name{labels}.
func scrapeAll(t *testing.T, h *harness) map[string]float64 {
	t.Helper()
	out := map[string]float64{}
	for _, line := range strings.Split(string(httpGet(t, "http://"+h.agent.MetricsAddr().String()+"/metrics")), "\n") {
		if line == "" || line[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		var v float64
		if _, err := fmtSscan(line[i+1:], &v); err == nil {
			out[line[:i]] = v
		}
	}
	return out
}

// With the audit log failing mid-session, no further statement reaches
// Postgres, the client gets 58030, and new sessions are refused.
func TestAuditFailClosed(t *testing.T) {
	for _, loop := range []bool{false, true} {
		t.Run(map[bool]string{false: "goroutines", true: "event-loop"}[loop], func(t *testing.T) { testAuditFailClosed(t, loop) })
	}
}

func testAuditFailClosed(t *testing.T, loop bool) {
	testenv.RequireRoot(t)
	dir, err := os.MkdirTemp("", "pgwa-audit-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	if out, err := execCommand("mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", dir); err != nil {
		t.Fatalf("mount tmpfs: %v %s", err, out)
	}
	defer execCommand("umount", "-l", dir)
	h := newHarness(t, func(h *harness, c *Config) { c.Audit.Path = dir + "/audit.jsonl"; c.Listen.EventLoop = loop })
	h.auditPath = dir + "/audit.jsonl"
	ctx := context.Background()
	admin, err := h.pg.Admin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(ctx)
	if _, err := admin.Exec(ctx, "drop table if exists failclosed; create table failclosed (n int); grant all on failclosed to "+testenv.ScramUser); err != nil {
		t.Fatal(err)
	}
	c := h.connect(t, testenv.ScramUser, "orders")
	if _, err := c.Exec(ctx, "insert into failclosed values (1)"); err != nil {
		t.Fatal(err)
	}
	// Fill the file system: the next audit line cannot be written.
	filler, _ := os.Create(dir + "/filler")
	buf := make([]byte, 4096)
	for {
		if _, err := filler.Write(buf); err != nil {
			break
		}
	}
	filler.Close()
	// The audit file's last page may still hold a line or two: go on until
	// the first statement whose audit line cannot be written.
	refused := 0
	for i := 2; i < 200; i++ {
		_, err = c.Exec(ctx, fmt.Sprintf("insert into failclosed values (%d)", i))
		if err != nil {
			var pgErr *pgconn.PgError
			if !errors.As(err, &pgErr) || pgErr.Code != broker.CodeIOError {
				t.Fatalf("statement %d with the audit log full: %v; want 58030", i, err)
			}
			refused = i
			break
		}
	}
	if refused == 0 {
		t.Fatal("the audit log never filled up")
	}
	var count int
	if err := admin.QueryRow(ctx, "select count(*) from failclosed where n = $1", refused).Scan(&count); err != nil || count != 0 {
		t.Fatalf("unaudited statement reached Postgres: %d rows %v", count, err)
	}
	if err := admin.QueryRow(ctx, "select count(*) from failclosed where n < $1", refused).Scan(&count); err != nil || count != refused-1 {
		t.Fatalf("audited statements before it: %d rows, want %d (%v)", count, refused-1, err)
	}
	e := connectErr(t, h.dsn(testenv.ScramUser, "orders"))
	if e.Code != broker.CodeIOError || !strings.Contains(e.Message, "audit log is unavailable") {
		t.Fatalf("new session with the audit log full: %s %q", e.Code, e.Message)
	}
	// Space returns: sessions work again and the chain is intact.
	os.Remove(dir + "/filler")
	c2 := h.connect(t, testenv.ScramUser, "orders")
	if _, err := c2.Exec(ctx, "insert into failclosed values (1000)"); err != nil {
		t.Fatal(err)
	}
	c2.Close(ctx)
	h.stop()
	if _, err := exporter.VerifyFiles(h.auditPath); err != nil {
		t.Fatalf("audit chain after recovery: %v", err)
	}
	if n := countStr(readFile(t, h.auditPath), fmt.Sprintf(`"db_query":"insert into failclosed values (%d)"`, refused)); n != 0 {
		// The refused statement may be audited only if its line was written, which it was not.
		t.Fatalf("refused statement audited %d times", n)
	}
}
