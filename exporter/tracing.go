package exporter

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"os"
	"strconv"
	"strings"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/exporters/stdout/stdouttrace"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"

	"github.com/pgward/pgward/broker"
)

// NewTracerProvider builds the OpenTelemetry SDK tracer provider from the
// standard environment (env is usually os.Getenv):
//
//	OTEL_EXPORTER_OTLP_TRACES_ENDPOINT  full URL of the traces endpoint, used as is
//	OTEL_EXPORTER_OTLP_ENDPOINT         base URL; http/protobuf appends /v1/traces
//	OTEL_EXPORTER_OTLP_TRACES_PROTOCOL,
//	OTEL_EXPORTER_OTLP_PROTOCOL         grpc | http/protobuf (default, as the spec says)
//	OTEL_TRACES_EXPORTER                otlp (default when an endpoint is set) | none |
//	                                    console (one JSON line per span, to WithConsole's
//	                                    writer, default stdout: a newcomer's way to see a trace)
//	OTEL_TRACES_SAMPLER[_ARG]           always_on, always_off, traceidratio,
//	                                    parentbased_always_on (default),
//	                                    parentbased_always_off, parentbased_traceidratio
//	OTEL_SERVICE_NAME                   default "pgward"
//
// An http:// endpoint is plaintext, https:// uses TLS. The exporters
// themselves read the remaining OTEL_EXPORTER_OTLP_* variables (headers,
// certificate, compression, timeout) from the process environment.
//
// With no endpoint set (or OTEL_TRACES_EXPORTER=none) the provider still
// mints trace and span ids — the broker uses the session's trace id as
// request_id — but records no span, whatever the sampler: a span no
// exporter takes is work per statement for nothing (about 1.7 µs and
// 1.6 KB per statement on the development machine, BenchmarkStatementSpan;
// the observer starts no statement span under a session span that is not
// recording). Spans not recorded still carry valid ids; the audit's
// span_id, which would name a span no backend has, is then absent.
//
// shutdown flushes queued spans and stops the exporter; call it once on exit.
func NewTracerProvider(ctx context.Context, env func(string) string, opts ...TracingOption) (trace.TracerProvider, func(context.Context) error, error) {
	var o tracingOptions
	for _, opt := range opts {
		opt(&o)
	}
	sampler, err := samplerFromEnv(env)
	if err != nil {
		return nil, nil, err
	}
	name := env("OTEL_SERVICE_NAME")
	if name == "" {
		name = "pgward"
	}
	res, err := resource.Merge(resource.Default(), resource.NewSchemaless(attribute.String("service.name", name)))
	if err != nil {
		return nil, nil, fmt.Errorf("tracing resource: %w", err)
	}
	exp, err := newSpanExporter(ctx, env, o)
	if err != nil {
		return nil, nil, err
	}
	if exp == nil {
		sampler = sdktrace.NeverSample() // OTEL_TRACES_SAMPLER was still checked above
	}
	tpOpts := []sdktrace.TracerProviderOption{sdktrace.WithSampler(sampler), sdktrace.WithResource(res)}
	if exp != nil {
		tpOpts = append(tpOpts, sdktrace.WithBatcher(exp))
	}
	tp := sdktrace.NewTracerProvider(tpOpts...)
	return tp, tp.Shutdown, nil
}

// A TracingOption tunes NewTracerProvider.
type TracingOption func(*tracingOptions)

type tracingOptions struct {
	console io.Writer
}

// WithConsole is where OTEL_TRACES_EXPORTER=console writes spans (default
// os.Stdout).
func WithConsole(w io.Writer) TracingOption {
	return func(o *tracingOptions) { o.console = w }
}

// OTelErrorHandler sends what the OpenTelemetry SDK reports (a failed export,
// a full queue) to log at WARN, so that it is a structured line like the
// others rather than a plain line inside the JSON log. main installs it with
// otel.SetErrorHandler, the SDK's only way to report.
func OTelErrorHandler(log *slog.Logger) otel.ErrorHandler {
	return otel.ErrorHandlerFunc(func(err error) {
		log.Warn("trace export problem", "component", "opentelemetry", "err", err)
	})
}

func newSpanExporter(ctx context.Context, env func(string) string, o tracingOptions) (sdktrace.SpanExporter, error) {
	switch e := strings.TrimSpace(env("OTEL_TRACES_EXPORTER")); e {
	case "", "otlp":
	case "none":
		return nil, nil
	case "console":
		w := o.console
		if w == nil {
			w = os.Stdout
		}
		exp, err := stdouttrace.New(stdouttrace.WithWriter(w))
		if err != nil {
			return nil, fmt.Errorf("console span exporter: %w", err)
		}
		return exp, nil
	default:
		return nil, fmt.Errorf("OTEL_TRACES_EXPORTER=%q: want otlp, console or none", e)
	}
	endpoint, base := env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"), false
	if endpoint == "" {
		endpoint, base = env("OTEL_EXPORTER_OTLP_ENDPOINT"), true
	}
	if endpoint == "" {
		return nil, nil
	}
	u, err := url.Parse(endpoint)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("OTLP endpoint %q: want an http:// or https:// URL", endpoint)
	}
	protocol := env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
	if protocol == "" {
		protocol = env("OTEL_EXPORTER_OTLP_PROTOCOL")
	}
	switch protocol {
	case "grpc":
		exp, err := otlptracegrpc.New(ctx, otlptracegrpc.WithEndpointURL(endpoint))
		if err != nil {
			return nil, fmt.Errorf("otlp grpc exporter: %w", err)
		}
		return exp, nil
	case "", "http/protobuf":
		if base {
			u.Path = strings.TrimSuffix(u.Path, "/") + "/v1/traces"
		}
		exp, err := otlptracehttp.New(ctx, otlptracehttp.WithEndpointURL(u.String()))
		if err != nil {
			return nil, fmt.Errorf("otlp http exporter: %w", err)
		}
		return exp, nil
	default:
		return nil, fmt.Errorf("OTEL_EXPORTER_OTLP_PROTOCOL=%q: want grpc or http/protobuf", protocol)
	}
}

func samplerFromEnv(env func(string) string) (sdktrace.Sampler, error) {
	name, arg := strings.TrimSpace(env("OTEL_TRACES_SAMPLER")), strings.TrimSpace(env("OTEL_TRACES_SAMPLER_ARG"))
	ratio := func() (float64, error) {
		if arg == "" {
			return 1, nil
		}
		r, err := strconv.ParseFloat(arg, 64)
		if err != nil || r < 0 || r > 1 {
			return 0, fmt.Errorf("OTEL_TRACES_SAMPLER_ARG=%q: want a ratio between 0 and 1", arg)
		}
		return r, nil
	}
	switch name {
	case "", "parentbased_always_on":
		return sdktrace.ParentBased(sdktrace.AlwaysSample()), nil
	case "always_on":
		return sdktrace.AlwaysSample(), nil
	case "always_off":
		return sdktrace.NeverSample(), nil
	case "parentbased_always_off":
		return sdktrace.ParentBased(sdktrace.NeverSample()), nil
	case "traceidratio", "parentbased_traceidratio":
		r, err := ratio()
		if err != nil {
			return nil, err
		}
		if name == "traceidratio" {
			return sdktrace.TraceIDRatioBased(r), nil
		}
		return sdktrace.ParentBased(sdktrace.TraceIDRatioBased(r)), nil
	}
	return nil, errors.New("OTEL_TRACES_SAMPLER=" + strconv.Quote(name) +
		": want one of always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off, parentbased_traceidratio")
}

// The session traces (DESIGN.md §5): pgward.session → pgward.auth with
// children identity.verify, credentials.fetch, upstream.auth; then a span
// per statement following the OTel database conventions. The Observer
// makes them from the broker's calls; the broker makes none.

const tracerName = "github.com/pgward/pgward"

var stageSpanNames = map[broker.Stage]string{
	broker.StageIdentity:     "identity.verify",
	broker.StageCredentials:  "credentials.fetch",
	broker.StageUpstreamAuth: "upstream.auth",
}

// startRequestSpans opens pgward.session and pgward.auth. The session's
// trace id becomes the request_id when it is valid (the SDK mints one even
// for a trace it does not sample), so one key finds the log lines, the
// audit events and the trace.
func startRequestSpans(ctx context.Context, tr trace.Tracer, r *broker.Request) (context.Context, trace.Span, trace.Span) {
	ctx, span := tr.Start(ctx, "pgward.session", trace.WithSpanKind(trace.SpanKindServer), trace.WithTimestamp(r.Start))
	if id := span.SpanContext().TraceID(); id.IsValid() {
		r.RequestID = id.String()
	}
	span.SetAttributes(attribute.String("pgward.request_id", r.RequestID))
	_, auth := tr.Start(ctx, "pgward.auth")
	return ctx, span, auth
}

func startStageSpan(ctx context.Context, tr trace.Tracer, auth trace.Span, st broker.Stage) context.Context {
	name, ok := stageSpanNames[st]
	if !ok {
		name = string(st)
	}
	ctx, _ = tr.Start(trace.ContextWithSpan(ctx, auth), name)
	return ctx
}

// endStageSpan ends the stage's span. A failure is marked with a fixed
// description: the error may come from a secrets backend.
func endStageSpan(ctx context.Context, st broker.Stage, err error) {
	sp := trace.SpanFromContext(ctx)
	if err != nil {
		sp.SetStatus(codes.Error, stageSpanNames[st]+" failed")
	}
	sp.End()
}

// endRequestSpans ends a request that got no session (code is the
// SQLSTATE the client got).
func endRequestSpans(span, auth trace.Span, code string) {
	if code != "" {
		auth.SetStatus(codes.Error, code)
		span.SetStatus(codes.Error, code)
	}
	auth.End()
	span.End()
}

func endSessionSpan(span trace.Span, reason broker.EndReason) {
	span.SetAttributes(attribute.String("pgward.end_reason", string(reason)))
	if reason.Failed() {
		span.SetStatus(codes.Error, string(reason))
	}
	span.End()
}

// startStatementSpan starts a statement's span under the session's. Its
// text is redacted by the audit's rule (redact.go): a password literal is
// replaced, the rest kept.
func startStatementSpan(ctx context.Context, tr trace.Tracer, s *broker.SessionInfo, q *broker.QueryEvent) trace.Span {
	if q.BindOnly || q.FunctionOID != 0 {
		return nil // as before the seam: spans for Query and Execute
	}
	// q.Text may point into the relay buffer: the span keeps a copy.
	text, _ := redactSQL(q.Text)
	text = strings.Clone(text)
	op := operationName(text)
	_, sp := tr.Start(ctx, op, trace.WithSpanKind(trace.SpanKindClient),
		trace.WithAttributes(
			attribute.String("db.system.name", "postgresql"),
			attribute.String("db.namespace", s.Database),
			attribute.String("db.query.text", text),
			attribute.String("db.operation.name", op),
			attribute.String("pgward.request_id", s.RequestID),
		))
	return sp
}

// endStatementSpan ends a statement's span; code is the SQLSTATE of a
// failure.
func endStatementSpan(sp trace.Span, code string) {
	if sp == nil {
		return
	}
	if code != "" {
		sp.SetStatus(codes.Error, code)
		sp.SetAttributes(attribute.String("db.response.status_code", code))
	}
	sp.End()
}

// operationName is the statement's first keyword, upper-cased.
func operationName(text string) string {
	t := strings.TrimSpace(text)
	if i := strings.IndexAny(t, " \t\n\r(;"); i >= 0 {
		t = t[:i]
	}
	if t == "" {
		return "statement"
	}
	return strings.ToUpper(t)
}
