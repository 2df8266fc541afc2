package exporter

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	commonpb "go.opentelemetry.io/proto/otlp/common/v1"

	"github.com/pgward/pgward/broker"
)

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
	rec := shipRecord(lines[0], "start", time.Now())
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
	res := attrs(shipRecord(lines[1], "start", time.Now()).Attributes)
	if res["db.response.status_code"] != "42P01" || res["error.type"] != "42P01" || res["pgward.success"] != false {
		t.Errorf("result attributes %v", res)
	}
}
