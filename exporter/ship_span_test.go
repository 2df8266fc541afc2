package exporter_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"github.com/pgward/pgward/broker"
	"github.com/pgward/pgward/exporter"
	"github.com/pgward/pgward/testenv"
)

// Each shipped statement record carries the trace id and the span id the
// tracer recorded for its statement: the query event and its result both
// point at the statement's span, the session's events at no span.
func TestShipSpanIDs(t *testing.T) {
	col := testenv.RequireCollector(t)
	fx := newShipFixture(t, col, exporter.AuditConfig{}, exporter.ShipGRPC)
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSampler(sdktrace.AlwaysSample()), sdktrace.WithSpanProcessor(rec))
	defer tp.Shutdown(context.Background())
	obs := exporter.NewObserver(fx.log, exporter.NewMetrics(prometheus.NewRegistry()), fx.audit, exporter.WithTracerProvider(tp))
	defer obs.Close()

	ctx := context.Background()
	s := testSession()
	req := &broker.Request{Start: time.Now()}
	ctx, ro := obs.Begin(ctx, req)
	s.RequestID = req.RequestID // the session's trace id, as the broker does
	so, err := ro.Started(ctx, &broker.AuthRequest{RequestID: req.RequestID}, s)
	if err != nil {
		t.Fatal(err)
	}
	// One statement alone and three read together (the batch path).
	text := func(i int) string { return fmt.Sprintf("select %d from orders", i) }
	batches := [][]*broker.QueryEvent{
		{{Index: 1, Text: text(1)}},
		{{Index: 2, Text: text(2)}, {Index: 3, Text: text(3)}, {Index: 4, Text: text(4)}},
	}
	for _, qs := range batches {
		if err := so.Statements(ctx, qs); err != nil {
			t.Fatal(err)
		}
		for _, q := range qs {
			q.Success, q.Rows = true, 1
			so.Result(ctx, q)
		}
	}
	so.End(ctx)

	// The spans the tracer recorded, by statement text.
	spans := map[string]sdktrace.ReadOnlySpan{}
	for _, sp := range rec.Ended() {
		for _, kv := range sp.Attributes() {
			if kv.Key == "db.query.text" {
				spans[kv.Value.AsString()] = sp
			}
		}
	}
	if len(spans) != 4 {
		t.Fatalf("%d statement spans recorded, want 4", len(spans))
	}

	want := spoolLines(t, fx.cfg.Path)
	got := waitDelivered(t, col, want, 30*time.Second)
	checked := 0
	for _, line := range want {
		r := got[line]
		if r.TraceID != req.RequestID {
			t.Errorf("trace id %q, want the session's %q: %s", r.TraceID, req.RequestID, line)
		}
		ev := r.Attrs["event.name"]
		switch ev {
		case exporter.EventQuery, exporter.EventQueryResult:
		default:
			if r.SpanID != "" || strings.Contains(line, `"span_id"`) {
				t.Errorf("%s carries span id %q", ev, r.SpanID)
			}
			continue
		}
		var idx int
		if i := strings.Index(line, `"query_index":`); i >= 0 {
			fmt.Sscanf(line[i+len(`"query_index":`):], "%d", &idx)
		}
		sp, ok := spans[text(idx)]
		if !ok {
			t.Fatalf("no span for statement %d: %s", idx, line)
		}
		if want := sp.SpanContext().SpanID().String(); r.SpanID != want || !strings.Contains(line, `"span_id":"`+want+`"`) {
			t.Errorf("%s of statement %d: span id %q in the record, want %q (the tracer's): %s", ev, idx, r.SpanID, want, line)
		}
		if sp.SpanContext().TraceID().String() != r.TraceID {
			t.Errorf("statement %d: span trace %s, record trace %s", idx, sp.SpanContext().TraceID(), r.TraceID)
		}
		checked++
	}
	if checked != 8 {
		t.Errorf("%d statement records checked, want 8 (4 queries, 4 results)", checked)
	}
	if _, err := exporter.VerifyFiles(auditFilesOf(t, fx.cfg.Path)...); err != nil {
		t.Fatalf("the audit file does not verify: %v", err)
	}
}
