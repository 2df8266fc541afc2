// Package otlptest is an in-process OTLP trace receiver for tests: it
// listens on loopback over gRPC or HTTP, decodes the official OTLP protobufs
// (go.opentelemetry.io/proto/otlp) and keeps the spans it was sent, so a test
// can assert the span tree a real exporter produced.
//
// It does not implement metrics or logs, retries, or partial-success answers.
package otlptest

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/hex"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	coltracepb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	commonpb "go.opentelemetry.io/proto/otlp/common/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
)

// Span is one received span, with ids in lower-case hex.
type Span struct {
	Name     string
	TraceID  string
	SpanID   string
	ParentID string // "" for a root span
	Kind     string // e.g. "SPAN_KIND_SERVER"
	Status   string // e.g. "STATUS_CODE_ERROR"; "" when unset
	// Attributes of the span; values are string, bool, int64, float64, or
	// fmt-printed for arrays and maps.
	Attributes map[string]any
	// Resource attributes of the batch the span came in (service.name, …).
	Resource map[string]any
	Scope    string // instrumentation scope name
}

// Receiver collects spans. Its methods are safe for concurrent use.
type Receiver struct {
	endpoint string
	mu       sync.Mutex
	spans    []Span
	changed  chan struct{}
	requests int
}

// Endpoint is the URL to export to (http://127.0.0.1:PORT), fit for
// OTEL_EXPORTER_OTLP_ENDPOINT with the matching OTEL_EXPORTER_OTLP_PROTOCOL.
func (r *Receiver) Endpoint() string { return r.endpoint }

// Spans returns a copy of the spans received so far, in arrival order.
func (r *Receiver) Spans() []Span {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Span(nil), r.spans...)
}

// Requests is how many export requests arrived.
func (r *Receiver) Requests() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.requests
}

// WaitSpans waits until at least n spans arrived, failing the test after timeout.
func (r *Receiver) WaitSpans(t testing.TB, n int, timeout time.Duration) []Span {
	t.Helper()
	deadline := time.After(timeout)
	for {
		r.mu.Lock()
		got, ch := len(r.spans), r.changed
		r.mu.Unlock()
		if got >= n {
			return r.Spans()
		}
		select {
		case <-ch:
		case <-deadline:
			t.Fatalf("otlptest: %d spans after %v, want %d", got, timeout, n)
		}
	}
}

func newReceiver() *Receiver { return &Receiver{changed: make(chan struct{})} }

func (r *Receiver) add(req *coltracepb.ExportTraceServiceRequest) {
	var spans []Span
	for _, rs := range req.GetResourceSpans() {
		res := attrs(rs.GetResource().GetAttributes())
		for _, ss := range rs.GetScopeSpans() {
			for _, s := range ss.GetSpans() {
				spans = append(spans, Span{
					Name:       s.GetName(),
					TraceID:    hex.EncodeToString(s.GetTraceId()),
					SpanID:     hex.EncodeToString(s.GetSpanId()),
					ParentID:   hex.EncodeToString(s.GetParentSpanId()),
					Kind:       s.GetKind().String(),
					Status:     statusString(s),
					Attributes: attrs(s.GetAttributes()),
					Resource:   res,
					Scope:      ss.GetScope().GetName(),
				})
			}
		}
	}
	r.mu.Lock()
	r.requests++
	r.spans = append(r.spans, spans...)
	close(r.changed)
	r.changed = make(chan struct{})
	r.mu.Unlock()
}

func statusString(s *tracepb.Span) string {
	if c := s.GetStatus().GetCode(); c != tracepb.Status_STATUS_CODE_UNSET {
		return c.String()
	}
	return ""
}

func attrs(kvs []*commonpb.KeyValue) map[string]any {
	m := make(map[string]any, len(kvs))
	for _, kv := range kvs {
		m[kv.GetKey()] = value(kv.GetValue())
	}
	return m
}

func value(v *commonpb.AnyValue) any {
	switch x := v.GetValue().(type) {
	case *commonpb.AnyValue_StringValue:
		return x.StringValue
	case *commonpb.AnyValue_BoolValue:
		return x.BoolValue
	case *commonpb.AnyValue_IntValue:
		return x.IntValue
	case *commonpb.AnyValue_DoubleValue:
		return x.DoubleValue
	case *commonpb.AnyValue_BytesValue:
		return x.BytesValue
	case *commonpb.AnyValue_ArrayValue:
		var out []any
		for _, e := range x.ArrayValue.GetValues() {
			out = append(out, value(e))
		}
		return out
	case *commonpb.AnyValue_KvlistValue:
		return attrs(x.KvlistValue.GetValues())
	}
	return nil
}

type grpcService struct {
	coltracepb.UnimplementedTraceServiceServer
	r *Receiver
}

func (g grpcService) Export(_ context.Context, req *coltracepb.ExportTraceServiceRequest) (*coltracepb.ExportTraceServiceResponse, error) {
	g.r.add(req)
	return &coltracepb.ExportTraceServiceResponse{}, nil
}

// NewGRPC starts a receiver speaking OTLP/gRPC (plaintext) on loopback; it
// stops when the test ends.
func NewGRPC(t testing.TB) *Receiver {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := newReceiver()
	r.endpoint = "http://" + ln.Addr().String()
	srv := grpc.NewServer()
	coltracepb.RegisterTraceServiceServer(srv, grpcService{r: r})
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(ln)
	}()
	t.Cleanup(func() {
		srv.Stop()
		<-done
	})
	return r
}

// NewHTTP starts a receiver speaking OTLP/HTTP on loopback at /v1/traces,
// accepting protobuf or JSON bodies, gzip-compressed or not; it stops when
// the test ends.
func NewHTTP(t testing.TB) *Receiver {
	t.Helper()
	r := newReceiver()
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/traces", func(w http.ResponseWriter, req *http.Request) {
		var body io.Reader = req.Body
		if req.Header.Get("Content-Encoding") == "gzip" {
			zr, err := gzip.NewReader(req.Body)
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			body = zr
		}
		b, err := io.ReadAll(body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		var msg coltracepb.ExportTraceServiceRequest
		ct := req.Header.Get("Content-Type")
		if ct == "application/json" {
			err = protojson.Unmarshal(b, &msg)
		} else {
			err = proto.Unmarshal(b, &msg)
		}
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		r.add(&msg)
		out, _ := proto.Marshal(&coltracepb.ExportTraceServiceResponse{})
		w.Header().Set("Content-Type", "application/x-protobuf")
		_, _ = io.Copy(w, bytes.NewReader(out))
	})
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	r.endpoint = srv.URL
	return r
}
