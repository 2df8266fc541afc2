package broker

import (
	"context"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/pgward/pgward/testenv"
)

// A pipelined batch (one Sync for three statements, the second failing):
// the broker reports each statement's result on its own statement, and the
// one the server skipped after the error as not executed.
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

	// What the broker reported of the session: each result on its own
	// statement, by index.
	var sess recSession
	eventually(t, "the session's end", func() bool {
		for _, rs := range h.obs.started() {
			if rs.start.ApplicationName == "pipeline-test" && rs.ended {
				sess = rs
				return true
			}
		}
		return false
	})
	results := map[string]*QueryEvent{}
	queries := map[int64]string{}
	for _, q := range sess.stmts {
		queries[q.Index] = q.Text
	}
	for i := range sess.results {
		results[queries[sess.results[i].Index]] = &sess.results[i]
	}
	if r := results["select $1::int as a"]; r == nil || !r.Success || r.Rows != 1 {
		t.Fatalf("first result: %+v", r)
	}
	if r := results["select 1/$1::int"]; r == nil || r.Success || r.Code != "22012" {
		t.Fatalf("second result: %+v", r)
	}
	if r := results["select $1::text"]; r == nil || r.Success || r.Code == "22012" {
		t.Fatalf("third (skipped) result: %+v", r)
	}
}
