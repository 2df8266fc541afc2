package exporter

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/prometheus/client_golang/prometheus"
	collogspb "go.opentelemetry.io/proto/otlp/collector/logs/v1"
	commonpb "go.opentelemetry.io/proto/otlp/common/v1"
	logspb "go.opentelemetry.io/proto/otlp/logs/v1"
	"google.golang.org/protobuf/proto"

	"github.com/pgward/pgward/broker"
)

// shipRecord encodes one line as the shipper does and decodes it with the
// generated types: the hand encoding must be what they read.
func shipRecord(t *testing.T, line []byte, fileStart string, now time.Time) *logspb.LogRecord {
	t.Helper()
	b := newShipBatch("node-a", "/var/log/pgward/audit.jsonl")
	if !b.add(line, fileStart, now) {
		t.Fatalf("line not encoded: %s", line)
	}
	var req collogspb.ExportLogsServiceRequest
	if err := proto.Unmarshal(b.request(), &req); err != nil {
		t.Fatalf("the request does not decode: %v", err)
	}
	rl := req.ResourceLogs
	if len(rl) != 1 || len(rl[0].ScopeLogs) != 1 || len(rl[0].ScopeLogs[0].LogRecords) != 1 ||
		rl[0].ScopeLogs[0].Scope.GetName() != shipScope || len(rl[0].Resource.GetAttributes()) != 4 {
		t.Fatalf("request shape %v", &req)
	}
	return rl[0].ScopeLogs[0].LogRecords[0]
}

// The attributes come from the line's own fields even when free-form
// values (pod labels, statement text, parameters) spell other fields' keys.
func TestShipRecordAttributes(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	a, err := OpenAudit(AuditConfig{Path: path, Parameters: ParamsFull}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	s := &broker.SessionInfo{
		RequestID: "4bf92f3577b34da6a3ce929d0e0e4736", SessionID: "sid-1", Protocol: "postgres",
		Upstream: "orders", Database: "orders", URI: "db:5432", User: "orders_rw", Principal: "billing",
		Identity: broker.Identity{PID: 4242, UID: 1001, User: "billing", Exe: "/usr/bin/psql", Comm: "psql",
			Pod: &broker.Pod{Namespace: "shop", Name: "billing-7d9", ServiceAccount: "billing",
				Labels: map[string]string{"db_query": "evil", "exe": "evil", "uid": "7", "name": "evil"}}},
		Start: time.Now(), Success: true,
	}
	obs := NewObserver(nil, NewMetrics(prometheus.NewRegistry()), a)
	ctx := context.Background()
	q := &broker.QueryEvent{Index: 1, Extended: true, Text: `select '"db_name":"evil"', $1`,
		Params: []broker.Param{{OID: 25, Value: []byte(`"success":false`)}}}
	if err := obs.Query(ctx, s, q); err != nil {
		t.Fatal(err)
	}
	q.Success, q.Rows, q.Code, q.Success = false, 0, "42P01", false
	obs.QueryDone(ctx, s, q)
	obs.Close()
	a.Close()
	data, _ := os.ReadFile(path)
	lines := bytes.Split(bytes.TrimSpace(data), []byte("\n"))
	if len(lines) != 2 {
		t.Fatalf("%d lines", len(lines))
	}
	attrs := func(r []*commonpb.KeyValue) map[string]any {
		m := map[string]any{}
		for _, kv := range r {
			switch v := kv.Value.Value.(type) {
			case *commonpb.AnyValue_StringValue:
				m[kv.Key] = v.StringValue
			case *commonpb.AnyValue_IntValue:
				m[kv.Key] = v.IntValue
			case *commonpb.AnyValue_BoolValue:
				m[kv.Key] = v.BoolValue
			}
		}
		return m
	}
	rec := shipRecord(t, lines[0], "start", time.Now())
	got := attrs(rec.Attributes)
	for k, want := range map[string]any{
		"db.system.name": "postgresql", "db.namespace": "orders", "db.query.text": `select '"db_name":"evil"', $1`,
		"process.pid": int64(4242), "process.user.id": int64(1001), "process.executable.path": "/usr/bin/psql",
		"process.owner": "billing", "k8s.pod.name": "billing-7d9", "k8s.namespace.name": "shop",
		"k8s.serviceaccount.name": "billing", "pgward.principal": "billing", "pgward.success": true,
		"event.name": "db.session.query", "pgward.audit.seq": int64(1), "session.id": "sid-1",
	} {
		if got[k] != want {
			t.Errorf("%s = %#v, want %#v", k, got[k], want)
		}
	}
	if string(rec.Body.GetStringValue()) != string(lines[0]) || rec.EventName != "db.session.query" ||
		len(rec.TraceId) != 16 || rec.TimeUnixNano == 0 {
		t.Errorf("record %v", rec)
	}
	var head struct{ Time time.Time }
	if err := json.Unmarshal(lines[0], &head); err != nil || rec.TimeUnixNano != uint64(head.Time.UnixNano()) {
		t.Errorf("time_unix_nano %d, the line's time %v (%v)", rec.TimeUnixNano, head.Time, err)
	}
	for _, tc := range []string{"2026-12-07T05:06:10.004309079Z", "2026-12-07T05:06:10Z", "2026-12-07T05:06:10.5Z", "2026-12-07T05:06:10.123+01:00"} {
		want, _ := time.Parse(time.RFC3339Nano, tc)
		if ns, ok := parseLineTime([]byte(tc)); !ok || ns != want.UnixNano() {
			t.Errorf("parseLineTime(%s) = %d, %v; want %d", tc, ns, ok, want.UnixNano())
		}
	}
	res := attrs(shipRecord(t, lines[1], "start", time.Now()).Attributes)
	if res["db.response.status_code"] != "42P01" || res["error.type"] != "42P01" || res["pgward.success"] != false {
		t.Errorf("result attributes %v", res)
	}
}

// FuzzShipRecord: any line a file may hold is encoded without a panic into
// a request the generated protobuf types read, with the line as the body
// and, for a valid audit line, the string fields as encoding/json reads them.
func FuzzShipRecord(f *testing.F) {
	data, err := os.ReadFile(filepath.Join("testdata", "audit-golden.jsonl"))
	if err != nil {
		f.Fatal(err)
	}
	for _, l := range bytes.Split(bytes.TrimSpace(data), []byte("\n")) {
		f.Add(l)
	}
	f.Add([]byte(`{"event":"a\u00e9\ud83d\ude00\"","db_query":"x\\\"y\n","process":{"pid":1,"pod":{"name":"p\"","labels":{"name":"no"}}},"rows":-3}`))
	f.Add([]byte(`{"db_query":"\ud800 lone","request_id":"zz"`))
	f.Fuzz(func(t *testing.T, line []byte) {
		b := newShipBatch("n", "p")
		if !b.add(line, zeroHash, time.Unix(0, 1)) {
			if utf8.Valid(line) {
				t.Fatalf("valid UTF-8 line refused: %q", line)
			}
			return
		}
		var req collogspb.ExportLogsServiceRequest
		if err := proto.Unmarshal(b.request(), &req); err != nil {
			t.Fatalf("request does not decode: %v (line %q)", err, line)
		}
		rec := req.ResourceLogs[0].ScopeLogs[0].LogRecords[0]
		if rec.Body.GetStringValue() != string(line) {
			t.Fatalf("body %q, line %q", rec.Body.GetStringValue(), line)
		}
		var m map[string]any
		if json.Unmarshal(line, &m) != nil {
			return
		}
		attrs := map[string]string{}
		for _, kv := range rec.Attributes {
			if _, dup := attrs[kv.Key]; !dup {
				attrs[kv.Key] = kv.Value.GetStringValue()
			}
		}
		for field, attr := range map[string]string{"db_query": "db.query.text", "principal": "pgward.principal", "sid": "session.id"} {
			want, isStr := m[field].(string)
			if !isStr || want == "" {
				continue
			}
			// encoding/json keeps the first of a repeated key's values
			// only when it is the last too; the shipper keeps the first.
			if bytes.Count(line, []byte(`"`+field+`"`)) > 1 {
				continue
			}
			if !utf8.ValidString(want) || strings.ContainsRune(want, utf8.RuneError) {
				continue // both replace bad sequences, maybe differently
			}
			if attrs[attr] != want {
				t.Fatalf("%s = %q, encoding/json reads %s = %q (line %q)", attr, attrs[attr], field, want, line)
			}
		}
	})
}
