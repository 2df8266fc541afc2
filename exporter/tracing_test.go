package exporter_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"go.opentelemetry.io/otel/codes"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"github.com/pgward/pgward/broker"
	"github.com/pgward/pgward/exporter"
	"github.com/pgward/pgward/exporter/otlptest"
)

// sessionTrace drives an Observer through one session with tp: the span
// tree of DESIGN §5, made from the broker's calls. It returns the trace id.
func sessionTrace(ctx context.Context, tp trace.TracerProvider) string {
	obs := exporter.NewObserver(nil, nil, nil, exporter.WithTracerProvider(tp))
	r := &broker.Request{RequestID: "minted-by-the-broker", Start: time.Now()}
	ctx, req := obs.Begin(ctx, r)
	for _, st := range []broker.Stage{broker.StageIdentity, broker.StageCredentials, broker.StageUpstreamAuth} {
		req.StageEnd(req.StageStart(ctx, st), st, nil)
	}
	s := &broker.SessionInfo{RequestID: r.RequestID, SessionID: "s1", Database: "orders", Success: true}
	sess, err := req.Started(ctx, &broker.AuthRequest{RequestID: r.RequestID}, s)
	if err != nil {
		panic(err)
	}
	q := &broker.QueryEvent{Index: 1, Text: "SELECT 1", Success: true}
	_ = sess.Statements(ctx, []*broker.QueryEvent{q})
	sess.Result(ctx, q)
	s.EndReason = broker.EndClientClosed
	sess.End(ctx)
	return r.RequestID
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
				"credentials.fetch": "pgward.auth", "upstream.auth": "pgward.auth", "SELECT": "pgward.session",
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
			if st := byName["SELECT"]; st.Attributes["db.system.name"] != "postgresql" || st.Attributes["db.namespace"] != "orders" ||
				st.Attributes["db.query.text"] != "SELECT 1" || st.Attributes["pgward.request_id"] != requestID || st.Kind != "SPAN_KIND_CLIENT" {
				t.Errorf("statement span attributes %v kind %s", st.Attributes, st.Kind)
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

// Without an exporter the provider mints ids (request_id is the session's
// trace id) and records no span, whatever the sampler says: a span nothing
// exports is work per statement for nothing.
func TestTracerProviderWithoutEndpoint(t *testing.T) {
	tests := []struct {
		name string
		env  map[string]string
	}{
		{"no endpoint", nil},
		{"exporter none", map[string]string{"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"}},
		{"sampled out", map[string]string{"OTEL_TRACES_SAMPLER": "always_off"}},
		{"always on", map[string]string{"OTEL_TRACES_SAMPLER": "always_on"}},
		{"ratio", map[string]string{"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1"}},
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
				sc, recording := s.SpanContext(), s.IsRecording()
				s.End()
				if !sc.TraceID().IsValid() || !sc.SpanID().IsValid() {
					t.Fatalf("no trace id minted: %v", sc)
				}
				if recording || sc.IsSampled() {
					t.Errorf("recording = %v, sampled = %v: want neither with no exporter", recording, sc.IsSampled())
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

// Statement spans carry the text the audit would write: one redaction
// rule (redact.go) for both. A password literal is replaced; a statement
// that only mentions passwords keeps its text. The request_id is the
// session trace's id, and every span of the session is in that trace.
func TestObserverSpans(t *testing.T) {
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	fx := newFixture(t, exporter.AuditConfig{Parameters: exporter.ParamsFull})
	obs := exporter.NewObserver(nil, nil, fx.audit, exporter.WithTracerProvider(tp))
	ctx := context.Background()
	r := &broker.Request{RequestID: "0123456789abcdef0123456789abcdef", Start: time.Now()}
	ctx, req := obs.Begin(ctx, r)
	sctx := req.StageStart(ctx, broker.StageCredentials)
	req.StageEnd(sctx, broker.StageCredentials, errors.New("vault: token s.SECRET denied"))
	s := testSession()
	s.RequestID = r.RequestID
	sess, err := req.Started(ctx, &broker.AuthRequest{RequestID: r.RequestID}, s)
	if err != nil {
		t.Fatal(err)
	}
	texts := []string{
		"ALTER ROLE orders_rw PASSWORD 'hunter2'",
		"SELECT password_changed_at FROM accounts",
		"CREATE USER x WITH ENCRYPTED PASSWORD $$hunter2$$",
	}
	var qs []*broker.QueryEvent
	for i, text := range texts {
		qs = append(qs, &broker.QueryEvent{Index: int64(i + 1), Text: text})
	}
	if err := sess.Statements(ctx, qs); err != nil {
		t.Fatal(err)
	}
	for _, q := range qs {
		q.Success = q.Index != 1
		q.Code = map[bool]string{false: "42501"}[q.Success]
		sess.Result(ctx, q)
	}
	s.EndReason = broker.EndClientClosed
	sess.End(ctx)

	audited := map[float64]string{}
	for _, l := range readLines(t, fx.path) {
		if l["event"] == "db.session.query" {
			audited[l["query_index"].(float64)] = l["db_query"].(string)
		}
	}
	spans := rec.Ended()
	var statements []sdktrace.ReadOnlySpan
	for _, sp := range spans {
		if sp.SpanContext().TraceID().String() != r.RequestID {
			t.Errorf("span %s in trace %s, want the request_id %s", sp.Name(), sp.SpanContext().TraceID(), r.RequestID)
		}
		if sp.Name() == "credentials.fetch" && (sp.Status().Code != codes.Error || strings.Contains(sp.Status().Description, "SECRET")) {
			t.Errorf("failed stage span status %v", sp.Status())
		}
		if sp.SpanKind() == trace.SpanKindClient {
			statements = append(statements, sp)
		}
	}
	if len(statements) != len(texts) {
		t.Fatalf("%d statement spans, want %d", len(statements), len(texts))
	}
	for i, sp := range statements {
		var text string
		for _, a := range sp.Attributes() {
			if a.Key == "db.query.text" {
				text = a.Value.AsString()
			}
		}
		if strings.Contains(text, "hunter2") {
			t.Errorf("span %d carries the password: %q", i+1, text)
		}
		if text != audited[float64(i+1)] {
			t.Errorf("span %d text %q, audit %q: want the same redaction", i+1, text, audited[float64(i+1)])
		}
	}
	if got := statements[1]; !strings.Contains(fmt.Sprint(got.Attributes()), "password_changed_at") {
		t.Errorf("a statement that only mentions passwords lost its text: %v", got.Attributes())
	}
	if statements[0].Status().Code != codes.Error {
		t.Errorf("failed statement span status %v", statements[0].Status())
	}
}
