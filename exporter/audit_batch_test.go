package exporter_test

import (
	"context"
	"testing"

	"github.com/pgward/pgward/broker"
	"github.com/pgward/pgward/exporter"
)

// A batch is written in order, chained like single events, and its results
// point back at each statement's ei.
func TestQueryBatch(t *testing.T) {
	fx := newFixture(t, exporter.AuditConfig{Durability: exporter.DurabilityWrite, Parameters: exporter.ParamsFull})
	ctx := context.Background()
	s := testSession()
	if err := fx.obs.SessionStart(ctx, s); err != nil {
		t.Fatal(err)
	}
	qs := []*broker.QueryEvent{
		{Index: 1, Text: "select 1"},
		{Index: 2, Extended: true, Text: "select $1", Params: []broker.Param{{OID: 25, Value: []byte("x")}}},
		{Index: 3, Text: "select 3"},
	}
	if err := fx.obs.QueryBatch(ctx, s, qs); err != nil {
		t.Fatal(err)
	}
	for _, q := range qs {
		q.Success = true
		fx.obs.QueryDone(ctx, s, q)
	}
	if err := fx.audit.Close(); err != nil {
		t.Fatal(err)
	}
	lines := readLines(t, fx.path)
	if len(lines) != 7 {
		t.Fatalf("%d lines, want 7", len(lines))
	}
	for i, q := range qs {
		l := lines[1+i]
		if l["event"] != exporter.EventQuery || l["db_query"] != q.Text || l["ei"] != float64(2+i) {
			t.Errorf("line %d: %v", 2+i, l)
		}
		r := lines[4+i]
		if r["query_ei"] != float64(2+i) {
			t.Errorf("result %d points at ei %v, want %d", i+1, r["query_ei"], 2+i)
		}
	}
	if n, err := exporter.VerifyFiles(fx.path); err != nil || n != 7 {
		t.Fatalf("verify: %d lines, %v", n, err)
	}
}

func BenchmarkAuditQueryBatch(b *testing.B) {
	fx := newFixtureLevel(b, exporter.AuditConfig{Durability: exporter.DurabilityWrite, Parameters: exporter.ParamsFull, MaxSize: 1 << 40}, 0)
	s := testSession()
	qs := make([]*broker.QueryEvent, 4)
	for i := range qs {
		qs[i] = &broker.QueryEvent{Extended: true, Text: "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
			Params: []broker.Param{{OID: 23, Value: []byte("4242")}}}
	}
	ctx := context.Background()
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		for j, q := range qs {
			q.Index = int64(4*i + j + 1)
		}
		if err := fx.obs.QueryBatch(ctx, s, qs); err != nil {
			b.Fatal(err)
		}
		for _, q := range qs {
			fx.obs.QueryDone(ctx, s, q)
		}
	}
}
