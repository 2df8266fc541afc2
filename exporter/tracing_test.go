package exporter_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	"github.com/pgward/pgward/exporter"
	"github.com/pgward/pgward/exporter/otlptest"
)

// sessionTrace creates the span tree of DESIGN §5 and returns the trace id.
func sessionTrace(ctx context.Context, tp trace.TracerProvider) string {
	tr := tp.Tracer("github.com/pgward/pgward/broker")
	ctx, session := tr.Start(ctx, "pgward.session", trace.WithSpanKind(trace.SpanKindServer))
	requestID := session.SpanContext().TraceID().String()
	session.SetAttributes(attribute.String("pgward.request_id", requestID))
	actx, auth := tr.Start(ctx, "pgward.auth")
	for _, name := range []string{"identity.verify", "credentials.fetch", "upstream.auth"} {
		_, s := tr.Start(actx, name)
		s.End()
	}
	auth.End()
	_, q := tr.Start(ctx, "SELECT orders", trace.WithSpanKind(trace.SpanKindClient), trace.WithAttributes(
		attribute.String("db.system.name", "postgresql"), attribute.String("db.namespace", "orders"),
		attribute.String("db.query.text", "SELECT 1"), attribute.String("db.operation.name", "SELECT")))
	q.End()
	session.End()
	return requestID
}

func TestTracerProviderExportsOverOTLP(t *testing.T) {
	tests := []struct {
		name     string
		receiver func(testing.TB) *otlptest.Receiver
		env      func(endpoint string) map[string]string
	}{
		{"grpc", otlptest.NewGRPC, func(ep string) map[string]string {
			return map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": ep, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
		}},
		{"http/protobuf", otlptest.NewHTTP, func(ep string) map[string]string {
			return map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": ep, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
		}},
		{"http default protocol, traces endpoint", otlptest.NewHTTP, func(ep string) map[string]string {
			return map[string]string{"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ep + "/v1/traces", "OTEL_SERVICE_NAME": "pgward-test"}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rcv := tt.receiver(t)
			env := tt.env(rcv.Endpoint())
			ctx := context.Background()
			tp, shutdown, err := exporter.NewTracerProvider(ctx, func(k string) string { return env[k] })
			if err != nil {
				t.Fatal(err)
			}
			requestID := sessionTrace(ctx, tp)
			sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			defer cancel()
			if err := shutdown(sctx); err != nil {
				t.Fatalf("shutdown: %v", err)
			}
			spans := rcv.WaitSpans(t, 6, 5*time.Second)
			byName := map[string]otlptest.Span{}
			for _, s := range spans {
				if s.TraceID != requestID {
					t.Errorf("span %s in trace %s, want %s", s.Name, s.TraceID, requestID)
				}
				byName[s.Name] = s
			}
			parent := map[string]string{
				"pgward.session": "", "pgward.auth": "pgward.session", "identity.verify": "pgward.auth",
				"credentials.fetch": "pgward.auth", "upstream.auth": "pgward.auth", "SELECT orders": "pgward.session",
			}
			for name, p := range parent {
				s, ok := byName[name]
				if !ok {
					t.Errorf("span %s not received; got %v", name, spans)
					continue
				}
				want := ""
				if p != "" {
					want = byName[p].SpanID
				}
				if s.ParentID != want {
					t.Errorf("span %s parent %q, want %s (%q)", name, s.ParentID, p, want)
				}
			}
			root := byName["pgward.session"]
			if root.Attributes["pgward.request_id"] != requestID || root.Kind != "SPAN_KIND_SERVER" {
				t.Errorf("root span attributes %v kind %s", root.Attributes, root.Kind)
			}
			if byName["SELECT orders"].Attributes["db.system.name"] != "postgresql" {
				t.Errorf("statement span attributes %v", byName["SELECT orders"].Attributes)
			}
			wantService := "pgward"
			if s := env["OTEL_SERVICE_NAME"]; s != "" {
				wantService = s
			}
			if root.Resource["service.name"] != wantService {
				t.Errorf("service.name = %v, want %s", root.Resource["service.name"], wantService)
			}
		})
	}
}

func TestTracerProviderWithoutEndpoint(t *testing.T) {
	tests := []struct {
		name    string
		env     map[string]string
		sampled bool
	}{
		{"no endpoint", nil, true},
		{"exporter none", map[string]string{"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"}, true},
		{"sampled out", map[string]string{"OTEL_TRACES_SAMPLER": "always_off"}, false},
		{"ratio", map[string]string{"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1"}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tp, shutdown, err := exporter.NewTracerProvider(context.Background(), func(k string) string { return tt.env[k] })
			if err != nil {
				t.Fatal(err)
			}
			defer shutdown(context.Background())
			ids := map[string]bool{}
			for range 3 {
				_, s := tp.Tracer("t").Start(context.Background(), "pgward.session")
				sc := s.SpanContext()
				s.End()
				if !sc.TraceID().IsValid() || !sc.SpanID().IsValid() {
					t.Fatalf("no trace id minted: %v", sc)
				}
				if sc.IsSampled() != tt.sampled {
					t.Errorf("sampled = %v, want %v", sc.IsSampled(), tt.sampled)
				}
				ids[sc.TraceID().String()] = true
			}
			if len(ids) != 3 {
				t.Errorf("trace ids repeat: %v", ids)
			}
		})
	}
}

func TestTracerProviderBadEnv(t *testing.T) {
	tests := []struct {
		env  map[string]string
		want string
	}{
		{map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_PROTOCOL"},
		{map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "127.0.0.1:4318"}, "http:// or https://"},
		{map[string]string{"OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER"},
		{map[string]string{"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"}, "OTEL_TRACES_SAMPLER_ARG"},
		{map[string]string{"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"},
	}
	for _, tt := range tests {
		_, _, err := exporter.NewTracerProvider(context.Background(), func(k string) string { return tt.env[k] })
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("env %v: err = %v, want one mentioning %s", tt.env, err, tt.want)
		}
	}
}

// OTEL_TRACES_EXPORTER=console writes each ended span as a JSON line to the
// given writer: the way a newcomer sees a session's trace (make demo).
func TestConsoleSpanExporter(t *testing.T) {
	var buf bytes.Buffer
	tp, shutdown, err := exporter.NewTracerProvider(context.Background(), func(k string) string {
		if k == "OTEL_TRACES_EXPORTER" {
			return "console"
		}
		return ""
	}, exporter.WithConsole(&buf))
	if err != nil {
		t.Fatal(err)
	}
	_, span := tp.Tracer("test").Start(context.Background(), "pgward.session")
	span.End()
	if err := shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	var s struct {
		Name        string
		SpanContext struct{ TraceID string }
	}
	if err := json.Unmarshal(bytes.SplitN(buf.Bytes(), []byte("\n"), 2)[0], &s); err != nil || s.Name != "pgward.session" || s.SpanContext.TraceID == "" {
		t.Fatalf("console output %q: %v", buf.String(), err)
	}
}

// What the SDK reports (an export that failed) becomes a structured WARN line.
func TestOTelErrorHandlerLogs(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(slog.NewJSONHandler(&buf, nil))
	exporter.OTelErrorHandler(log).Handle(errors.New("traces export: connection refused"))
	var line map[string]any
	if err := json.Unmarshal(buf.Bytes(), &line); err != nil || line["level"] != "WARN" || line["err"] != "traces export: connection refused" {
		t.Fatalf("logged %q (%v)", buf.String(), err)
	}
}
