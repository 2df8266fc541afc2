package testenv_test

import (
	"bytes"
	"context"
	"net"
	"net/http"
	"testing"
	"time"

	collogspb "go.opentelemetry.io/proto/otlp/collector/logs/v1"
	commonpb "go.opentelemetry.io/proto/otlp/common/v1"
	logspb "go.opentelemetry.io/proto/otlp/logs/v1"
	resourcepb "go.opentelemetry.io/proto/otlp/resource/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"

	"github.com/pgward/pgward/testenv"
)

func logsRequest(body string) *collogspb.ExportLogsServiceRequest {
	str := func(s string) *commonpb.AnyValue {
		return &commonpb.AnyValue{Value: &commonpb.AnyValue_StringValue{StringValue: s}}
	}
	return &collogspb.ExportLogsServiceRequest{ResourceLogs: []*logspb.ResourceLogs{{
		Resource: &resourcepb.Resource{Attributes: []*commonpb.KeyValue{{Key: "host.name", Value: str("node-a")}}},
		ScopeLogs: []*logspb.ScopeLogs{{LogRecords: []*logspb.LogRecord{{
			Body:       str(body),
			TraceId:    bytes.Repeat([]byte{0xab}, 16),
			SpanId:     bytes.Repeat([]byte{0xcd}, 8),
			Attributes: []*commonpb.KeyValue{{Key: "db.system.name", Value: str("postgresql")}},
		}}}},
	}}}
}

// TestCollectorReceivesLogs starts the real collector, sends it a log
// record over OTLP/gRPC and one over OTLP/HTTP, kills and restarts it, and
// reads all of them back from its file exporter's output.
func TestCollectorReceivesLogs(t *testing.T) {
	c := testenv.RequireCollector(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	sendGRPC := func(body string) {
		conn, err := grpc.NewClient(c.GRPCAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		if _, err := collogspb.NewLogsServiceClient(conn).Export(ctx, logsRequest(body)); err != nil {
			t.Fatalf("export over gRPC: %v", err)
		}
	}
	sendGRPC("over grpc")
	b, err := proto.Marshal(logsRequest("over http"))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.Post("http://"+c.HTTPAddr+"/v1/logs", "application/x-protobuf", bytes.NewReader(b))
	if err != nil {
		t.Fatalf("export over HTTP: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("export over HTTP: %s", resp.Status)
	}
	waitLogs(t, c, 2)

	c.Kill()
	if err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	sendGRPC("after restart")
	got := waitLogs(t, c, 3)
	bodies := map[string]bool{}
	for _, r := range got {
		bodies[r.Body] = true
		if r.TraceID != "abababababababababababababababab" || r.SpanID != "cdcdcdcdcdcdcdcd" ||
			r.Attrs["db.system.name"] != "postgresql" || r.Resource["host.name"] != "node-a" {
			t.Errorf("record arrived as %+v", r)
		}
	}
	for _, want := range []string{"over grpc", "over http", "after restart"} {
		if !bodies[want] {
			t.Errorf("%q did not arrive (got %v)", want, bodies)
		}
	}
}

func waitLogs(t *testing.T, c *testenv.Collector, n int) []testenv.LogRecord {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		got, err := c.Logs()
		if err != nil {
			t.Fatal(err)
		}
		if len(got) >= n || time.Now().After(deadline) {
			if len(got) < n {
				t.Fatalf("collector wrote %d log records, want %d", len(got), n)
			}
			return got
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// A port picked free can be taken by another process before the collector
// binds it (tests run side by side): the collector then exits, and
// StartCollector picks other ports and starts it again.
func TestCollectorPortTakenRetries(t *testing.T) {
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	busy := taken.Addr().(*net.TCPAddr).Port
	picks := 0
	testenv.SetCollectorPort(t, func() (int, error) {
		picks++
		if picks == 1 {
			return busy, nil // the gRPC receiver's, on the first attempt
		}
		return testenv.FreePort()
	})
	c := testenv.RequireCollector(t)
	// Two attempts of two ports at least: more if another test beside
	// this one takes a port of the second attempt too.
	if picks < 4 || picks%2 != 0 {
		t.Errorf("%d ports picked, want two per attempt and at least two attempts", picks)
	}
	if c.GRPCAddr == taken.Addr().String() {
		t.Fatalf("the collector reports the taken port %s", c.GRPCAddr)
	}
	conn, err := net.DialTimeout("tcp", c.GRPCAddr, time.Second)
	if err != nil {
		t.Fatalf("the restarted collector's gRPC receiver: %v", err)
	}
	conn.Close()
}
