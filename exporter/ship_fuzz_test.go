package exporter_test

import (
	"bytes"
	"testing"

	"github.com/pgward/pgward/exporter"
)

// FuzzReadShipped: whatever a store hands back, reading and verifying it
// never panics, and a node's reassembled files hold only distinct lines.
func FuzzReadShipped(f *testing.F) {
	f.Add([]byte(`{"resourceLogs":[{"resource":{"attributes":[{"key":"pgward.node","value":{"stringValue":"n"}}]},"scopeLogs":[{"logRecords":[{"body":{"stringValue":"{\"event\":\"x\",\"seq\":1,\"prev_hash\":\"0000000000000000000000000000000000000000000000000000000000000000\"}"},"attributes":[{"key":"pgward.audit.file_start","value":{"stringValue":"0000000000000000000000000000000000000000000000000000000000000000"}}]}]}]}]}`))
	f.Add([]byte("{\"resourceLogs\":[]}\n{\"resourceSpans\":[]}\n"))
	f.Add([]byte(`{"resourceLogs":[{"scopeLogs":[{"logRecords":[{"body":{"stringValue":"{\"seq\":2,\"prev_hash\":\"ab\"}"}}]}]}]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		nodes, _, err := exporter.ReadShipped(bytes.NewReader(data))
		if err != nil {
			return
		}
		for _, n := range nodes {
			seen := map[string]bool{}
			for _, f := range n.Files {
				for _, l := range f.Lines {
					if seen[string(l)] {
						t.Fatalf("line %q twice in node %q", l, n.Node)
					}
					seen[string(l)] = true
				}
			}
		}
		reps, err := exporter.VerifyShipped(nodes, exporter.VerifyOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range reps {
			r.WriteText(&bytes.Buffer{})
		}
	})
}

// A collector killed mid-write leaves a torn request; restarted, it appends
// the next one on the same line. The torn part is counted, the rest read.
func TestReadShippedTorn(t *testing.T) {
	zero := "0000000000000000000000000000000000000000000000000000000000000000"
	req := `{"resourceLogs":[{"resource":{"attributes":[{"key":"pgward.node","value":{"stringValue":"n"}}]},"scopeLogs":[{"logRecords":[{"body":{"stringValue":"{\"event\":\"x\",\"seq\":1,\"prev_hash\":\"` + zero + `\"}"}}]}]}]}`
	data := req[:40] + req + "\n"
	nodes, torn, err := exporter.ReadShipped(bytes.NewReader([]byte(data)))
	if err != nil || torn != 1 || len(nodes) != 1 || len(nodes[0].Files) != 1 || len(nodes[0].Files[0].Lines) != 1 {
		t.Fatalf("nodes %v, torn %d, err %v", nodes, torn, err)
	}
}
