package exporter

import (
	"context"
	"testing"

	"github.com/pgward/pgward/broker"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
)

// BenchmarkStatementSpan is what a statement's span costs when it is
// recorded. The observer starts none when the session's span is not
// recording, as with NewTracerProvider's provider when no exporter is set.
func BenchmarkStatementSpan(b *testing.B) {
	s := &broker.SessionInfo{Database: "bench", RequestID: "0123456789abcdef0123456789abcdef"}
	q := &broker.QueryEvent{Index: 1, Text: "SELECT abalance FROM pgbench_accounts WHERE aid = 12345;"}
	tr := sdktrace.NewTracerProvider().Tracer(tracerName)
	ctx, root := tr.Start(context.Background(), "pgward.session")
	defer root.End()
	b.ReportAllocs()
	for b.Loop() {
		endStatementSpan(startStatementSpan(ctx, tr, s, q), "")
	}
}
