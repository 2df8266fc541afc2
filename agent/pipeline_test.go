package agent

import (
	"context"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/pgward/pgward/testenv"
)

// A pipelined batch (one Sync for three statements, the second failing):
// each statement gets its own audit pair, and the one the server skipped
// after the error is recorded as not executed.
func TestPipelinedStatementsAttributed(t *testing.T) {
	h := newHarness(t, nil)
	ctx := context.Background()
	c := h.connect(t, testenv.ScramUser, "orders", "application_name=pipeline-test")
	b := &pgx.Batch{}
	b.Queue("select $1::int as a", 1)
	b.Queue("select 1/$1::int", 0)
	b.Queue("select $1::text", "never")
	br := c.SendBatch(ctx, b)
	if _, err := br.Exec(); err != nil {
		t.Fatalf("first: %v", err)
	}
	if _, err := br.Exec(); err == nil {
		t.Fatal("second succeeded")
	}
	br.Close()
	c.Close(ctx)

	var sid string
	findEvent(t, h, "db.session.end", func(ev map[string]any) bool {
		if ev["db_user"] == testenv.ScramUser && ev["success"] == true {
			sid = asString(ev["sid"])
			return true
		}
		return false
	})
	results := map[string]map[string]any{}
	queries := map[float64]string{}
	for _, ev := range h.auditEvents(t) {
		if ev["sid"] != sid {
			continue
		}
		switch ev["event"] {
		case "db.session.query":
			queries[ev["ei"].(float64)] = asString(ev["db_query"])
		case "db.session.query.result":
			results[queries[ev["query_ei"].(float64)]] = ev
		}
	}
	if r := results["select $1::int as a"]; r == nil || r["success"] != true || num(r["rows"]) != 1 {
		t.Fatalf("first result: %v", r)
	}
	if r := results["select 1/$1::int"]; r == nil || r["success"] != false || r["sqlstate"] != "22012" {
		t.Fatalf("second result: %v", r)
	}
	if r := results["select $1::text"]; r == nil || r["success"] != false || r["sqlstate"] == "22012" {
		t.Fatalf("third (skipped) result: %v", r)
	}
}
