package exporter_test

import (
	"context"
	"flag"
	"os"
	"path/filepath"
	"regexp"
	"testing"

	"github.com/pgward/pgward/broker"
	"github.com/pgward/pgward/exporter"
)

var updateGolden = flag.Bool("update", false, "rewrite testdata/audit-golden.jsonl from what the encoder writes")

// goldenMask replaces the fields that differ on every run (clock, random
// event id, and what hashes or signs them) with a fixed placeholder.
var goldenMask = regexp.MustCompile(`"(time|uid|prev_hash|head_hash|signature|key_id|node|first_time|last_time)":"[^"]*"`)

// TestAuditGoldenLines pins the bytes of the audit file: one event of every
// code, a batch of statements, a refusal summary and a checkpoint are
// written and compared, line for line and byte for byte, with
// testdata/audit-golden.jsonl once the fields that change on every run are
// masked. Field order, spelling, escaping and number formats are the
// format `pgward audit verify`, `pgward audit show` and the OTLP shipper
// read; a change here is a change of the audit format. Regenerate with
// `go test -run TestAuditGoldenLines ./exporter/ -update` only on purpose.
func TestAuditGoldenLines(t *testing.T) {
	key, _, _ := testKey(t)
	fx := newSigned(t, exporter.AuditConfig{Parameters: exporter.ParamsFull}, key)
	exampleEvents(t, fx)

	moreEvents(t, fx.obs)
	if err := fx.audit.Close(); err != nil { // the shutdown checkpoint
		t.Fatal(err)
	}
	verifyFile(t, fx.path)

	got := goldenMask.ReplaceAll(mustRead(t, fx.path), []byte(`"$1":"*"`))
	golden := filepath.Join("testdata", "audit-golden.jsonl")
	if *updateGolden {
		if err := os.WriteFile(golden, got, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	compareLines(t, golden, got, mustRead(t, golden))
}

// compareLines fails the test for each line of got that differs from want
// (the content of file).
func compareLines(t testing.TB, file string, got, want []byte) {
	t.Helper()
	gl, wl := splitLines(got), splitLines(want)
	for i := range max(len(gl), len(wl)) {
		var g, w string
		if i < len(gl) {
			g = gl[i]
		}
		if i < len(wl) {
			w = wl[i]
		}
		if g != w {
			t.Errorf("line %d differs from %s\n got %s\nwant %s", i+1, file, g, w)
		}
	}
}

// moreEvents writes, after exampleEvents, a session whose statements come
// in one batch (every kind of statement event), their results, and a
// refusal summary (written by obs.Close).
func moreEvents(t testing.TB, obs *exporter.Observer) {
	t.Helper()
	ctx := context.Background()
	s := testSession()
	s.SessionID, s.RequestID = "0d9a8f6e-1b2c-4d3e-9f80-a1b2c3d4e5f6", "c0ffee00c0ffee00c0ffee00c0ffee00"
	if err := obs.SessionStart(ctx, s); err != nil {
		t.Fatal(err)
	}
	qs := []*broker.QueryEvent{
		{Index: 1, Extended: true, Statement: "s1", Portal: "", Text: "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
			Params: []broker.Param{{OID: 23, Value: []byte("4242")}, {OID: 17, Format: 1, Value: []byte{0, 1, 0xff}}}},
		{Index: 2, Extended: true, BindOnly: true, Statement: "s2", Portal: "p", Text: "UPDATE t SET v = $1 -- \"quoted\"\n\tnext",
			Params: []broker.Param{{OID: 25, Value: nil}}},
		{Index: 3, FunctionOID: 1598, Params: []broker.Param{{OID: 23, Format: 1, Value: []byte{0, 0, 0, 7}}}},
		{Index: 4, Text: "SET ROLE admin", RoleChange: true},
	}
	if err := obs.QueryBatch(ctx, s, qs); err != nil {
		t.Fatal(err)
	}
	for i, q := range qs {
		q.Success, q.Rows, q.Tag = i != 1, int64(i), "UPDATE 1"
		if i == 1 {
			q.Code, q.Error, q.Rows, q.Tag = "22P02", "invalid input syntax for type integer: \"x\"", -1, ""
		}
		if i == 3 {
			q.ServerRole = "admin"
		}
		obs.QueryDone(ctx, s, q)
	}
	caller := broker.Identity{PID: 77, UID: 1003, GID: 1003, Cgroup: "/user.slice/flood.scope"}
	for range 2 {
		obs.SlotRefused(ctx, &broker.SlotRefusal{Reason: broker.SlotPerUID, Limit: 16, Peer: caller, PeerKnown: true})
	}
	if err := obs.Close(); err != nil { // the refusal summary
		t.Fatal(err)
	}
}

func splitLines(b []byte) []string {
	return regexp.MustCompile(`\n`).Split(string(b), -1)
}
