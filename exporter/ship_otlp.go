package exporter

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"time"

	collogspb "go.opentelemetry.io/proto/otlp/collector/logs/v1"
	commonpb "go.opentelemetry.io/proto/otlp/common/v1"
	logspb "go.opentelemetry.io/proto/otlp/logs/v1"
	resourcepb "go.opentelemetry.io/proto/otlp/resource/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// shipScope is the instrumentation scope of the shipped log records.
const shipScope = "github.com/pgward/pgward/exporter/audit"

var shipScopeProto = &commonpb.InstrumentationScope{Name: shipScope}

// lineField returns the value of the first "key": in an audit line: a
// string (unquoted), or the raw token of a number, bool or null. Keys cannot
// match inside string values, where every quote is escaped. The writer puts
// the top-level fields the shipper reads before the process object, whose
// own fields (pid, exe, …) have names of their own, so the first match is
// the right one.
func lineField(line []byte, key string) (string, bool) {
	var pat [64]byte
	p := append(pat[:0], '"')
	p = append(p, key...)
	p = append(p, '"', ':')
	i := bytes.Index(line, p)
	if i < 0 {
		return "", false
	}
	v := line[i+len(p):]
	if len(v) == 0 {
		return "", false
	}
	if v[0] != '"' {
		j := bytes.IndexAny(v, ",}]")
		if j < 0 {
			return "", false
		}
		return string(v[:j]), true
	}
	// A string: up to the first unescaped quote.
	esc := false
	for j := 1; j < len(v); j++ {
		switch {
		case esc:
			esc = false
		case v[j] == '\\':
			esc = true
		case v[j] == '"':
			raw := v[:j+1]
			if bytes.IndexByte(raw, '\\') < 0 {
				return string(raw[1:j]), true
			}
			var out string
			if json.Unmarshal(raw, &out) != nil {
				return "", false
			}
			return out, true
		}
	}
	return "", false
}

// splitProcess cuts an audit line around its "process":{…} object (nil
// when there is none, e.g. "process":null).
func splitProcess(line []byte) (before, proc, after []byte) {
	const key = `"process":{`
	i := bytes.Index(line, []byte(key))
	if i < 0 {
		return line, nil, nil
	}
	depth, inStr, esc := 0, false, false
	for j := i + len(key) - 1; j < len(line); j++ {
		c := line[j]
		switch {
		case esc:
			esc = false
		case inStr && c == '\\':
			esc = true
		case c == '"':
			inStr = !inStr
		case inStr:
		case c == '{':
			depth++
		case c == '}':
			depth--
			if depth == 0 {
				return line[:i], line[i : j+1], line[j+1:]
			}
		}
	}
	return line[:i], line[i:], nil
}

func strAttr(k, v string) *commonpb.KeyValue {
	return &commonpb.KeyValue{Key: k, Value: &commonpb.AnyValue{Value: &commonpb.AnyValue_StringValue{StringValue: v}}}
}

func intAttr(k string, v int64) *commonpb.KeyValue {
	return &commonpb.KeyValue{Key: k, Value: &commonpb.AnyValue{Value: &commonpb.AnyValue_IntValue{IntValue: v}}}
}

func boolAttr(k string, v bool) *commonpb.KeyValue {
	return &commonpb.KeyValue{Key: k, Value: &commonpb.AnyValue{Value: &commonpb.AnyValue_BoolValue{BoolValue: v}}}
}

// shipRecord makes the log record of one audit line: the line exactly as
// written is the body (so the chain verifies from what arrived), the rest is
// for searching, named by the OpenTelemetry semantic conventions where they
// have a name (database, process, Kubernetes) and pgward.* otherwise.
func shipRecord(line []byte, fileStart string, observed time.Time) *logspb.LogRecord {
	rec := &logspb.LogRecord{
		ObservedTimeUnixNano: uint64(observed.UnixNano()),
		SeverityNumber:       logspb.SeverityNumber_SEVERITY_NUMBER_INFO,
		SeverityText:         "INFO",
		Body:                 &commonpb.AnyValue{Value: &commonpb.AnyValue_StringValue{StringValue: string(line)}},
	}
	// Top-level fields are looked up outside the process object (its pod
	// labels are free-form keys), process fields inside it.
	before, proc, after := splitProcess(line)
	top := func(k string) (string, bool) {
		if v, ok := lineField(before, k); ok {
			return v, true
		}
		return lineField(after, k)
	}
	get := func(k string) string { v, _ := top(k); return v }
	pget := func(k string) string { v, _ := lineField(proc, k); return v }
	event := get("event")
	rec.EventName = event
	if t, err := time.Parse(time.RFC3339Nano, get("time")); err == nil {
		rec.TimeUnixNano = uint64(t.UnixNano())
	}
	reqID := get("request_id")
	if id, err := hex.DecodeString(reqID); err == nil && len(id) == 16 {
		rec.TraceId = id
	}
	if id, err := hex.DecodeString(get("span_id")); err == nil && len(id) == 8 {
		rec.SpanId = id
	}
	seq, _ := spoolSeq(line)
	a := make([]*commonpb.KeyValue, 0, 24)
	a = append(a, strAttr("event.name", event), intAttr("pgward.audit.seq", seq),
		strAttr("pgward.audit.file_start", fileStart))
	dbName, dbService, sqlstate := get("db_name"), get("db_service"), get("sqlstate")
	if dbService != "" || dbName != "" {
		a = append(a, strAttr("db.system.name", "postgresql"))
	}
	for _, kv := range [...][2]string{
		{"log.record.uid", get("uid")}, {"db.namespace", dbName}, {"db.query.text", get("db_query")},
		{"db.response.status_code", sqlstate}, {"session.id", get("sid")}, {"pgward.request_id", reqID},
		{"pgward.principal", get("principal")}, {"pgward.db_user", get("db_user")}, {"pgward.db_service", dbService},
		{"process.executable.path", pget("exe")}, {"process.executable.name", pget("comm")}, {"process.owner", pget("user")},
		{"container.id", pget("container_id")}, {"pgward.systemd_unit", pget("systemd_unit")},
	} {
		if kv[1] != "" {
			a = append(a, strAttr(kv[0], kv[1]))
		}
	}
	if v, ok := top("success"); ok && (v == "true" || v == "false") {
		a = append(a, boolAttr("pgward.success", v == "true"))
		if v == "false" {
			rec.SeverityNumber, rec.SeverityText = logspb.SeverityNumber_SEVERITY_NUMBER_WARN, "WARN"
			if sqlstate != "" {
				a = append(a, strAttr("error.type", sqlstate))
			}
		}
	}
	if v, ok := top("rows"); ok {
		if n, err := strconv.ParseInt(v, 10, 64); err == nil {
			a = append(a, intAttr("db.response.returned_rows", n))
		}
	}
	if v, ok := lineField(proc, "pid"); ok {
		if n, err := strconv.ParseInt(v, 10, 64); err == nil && n != 0 {
			a = append(a, intAttr("process.pid", n))
		}
	}
	if v, ok := lineField(proc, "uid"); ok {
		if n, err := strconv.ParseInt(v, 10, 64); err == nil {
			a = append(a, intAttr("process.user.id", n))
		}
	}
	if j := bytes.Index(proc, []byte(`"pod":{`)); j >= 0 {
		pod := proc[j:]
		ns, _ := lineField(pod, "namespace")
		name, _ := lineField(pod, "name")
		a = append(a, strAttr("k8s.pod.name", name), strAttr("k8s.namespace.name", ns))
		if sa, _ := lineField(pod, "service_account"); sa != "" {
			a = append(a, strAttr("k8s.serviceaccount.name", sa))
		}
	}
	rec.Attributes = a
	return rec
}

// shipResource names the node: host.name and pgward.node (the node name
// checkpoints carry), and the audit file the records come from.
func shipResource(node, path string) *resourcepb.Resource {
	return &resourcepb.Resource{Attributes: []*commonpb.KeyValue{
		strAttr("service.name", "pgward"), strAttr("host.name", node), strAttr("pgward.node", node),
		strAttr("log.file.path", path),
	}}
}

// shipSender sends one export request; it reports how many records the
// collector rejected for good (partial success).
type shipSender interface {
	send(ctx context.Context, req *collogspb.ExportLogsServiceRequest) (rejected int64, err error)
	close() error
}

// shipError is a failed export, with whether sending again can help and how
// long the collector asked to wait.
type shipError struct {
	err       error
	permanent bool // the request itself is refused (too large, malformed)
	after     time.Duration
}

func (e *shipError) Error() string { return e.err.Error() }
func (e *shipError) Unwrap() error { return e.err }

func shipTLS(c ShipConfig) (*tls.Config, error) {
	t := &tls.Config{MinVersion: tls.VersionTLS12}
	if c.CAFile != "" {
		pem, err := os.ReadFile(c.CAFile)
		if err != nil {
			return nil, err
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("%s: no PEM certificate in it", c.CAFile)
		}
		t.RootCAs = pool
	}
	return t, nil
}

func newShipSender(c ShipConfig, opts ...grpc.DialOption) (shipSender, error) {
	var tc *tls.Config
	if !c.insecure() {
		var err error
		if tc, err = shipTLS(c); err != nil {
			return nil, fieldError("audit.otlp.ca_file", "%w", err)
		}
	}
	if c.Protocol == ShipHTTP {
		scheme := "https"
		if tc == nil {
			scheme = "http"
		}
		return &httpSender{
			url:     scheme + "://" + c.Endpoint + c.urlPath,
			headers: c.Headers,
			client:  &http.Client{Transport: &http.Transport{TLSClientConfig: tc, MaxIdleConnsPerHost: 2}},
		}, nil
	}
	creds := insecure.NewCredentials()
	if tc != nil {
		creds = credentials.NewTLS(tc)
	}
	conn, err := grpc.NewClient(c.Endpoint, append(opts, grpc.WithTransportCredentials(creds))...)
	if err != nil {
		return nil, fmt.Errorf("audit.otlp.endpoint: %w", err)
	}
	var md metadata.MD
	if len(c.Headers) > 0 {
		md = metadata.New(c.Headers)
	}
	return &grpcSender{conn: conn, client: collogspb.NewLogsServiceClient(conn), md: md}, nil
}

type grpcSender struct {
	conn   *grpc.ClientConn
	client collogspb.LogsServiceClient
	md     metadata.MD
}

func (s *grpcSender) send(ctx context.Context, req *collogspb.ExportLogsServiceRequest) (int64, error) {
	if s.md != nil {
		ctx = metadata.NewOutgoingContext(ctx, s.md)
	}
	resp, err := s.client.Export(ctx, req)
	if err != nil {
		st := status.Convert(err)
		e := &shipError{err: fmt.Errorf("export audit over gRPC: %s: %s", st.Code(), st.Message())}
		switch st.Code() {
		case codes.InvalidArgument:
			e.permanent = true
		case codes.ResourceExhausted:
			// Too large for the receiver (no details) or a memory limiter
			// asking to wait (RetryInfo): only the first is the request's.
			e.permanent = len(st.Details()) == 0
		}
		return 0, e
	}
	return resp.GetPartialSuccess().GetRejectedLogRecords(), nil
}

func (s *grpcSender) close() error { return s.conn.Close() }

type httpSender struct {
	url     string
	headers map[string]string
	client  *http.Client
}

func (s *httpSender) send(ctx context.Context, req *collogspb.ExportLogsServiceRequest) (int64, error) {
	body, err := proto.Marshal(req)
	if err != nil {
		return 0, &shipError{err: err, permanent: true}
	}
	hr, err := http.NewRequestWithContext(ctx, http.MethodPost, s.url, bytes.NewReader(body))
	if err != nil {
		return 0, &shipError{err: err}
	}
	hr.Header.Set("Content-Type", "application/x-protobuf")
	for k, v := range s.headers {
		hr.Header.Set(k, v)
	}
	resp, err := s.client.Do(hr)
	if err != nil {
		return 0, &shipError{err: fmt.Errorf("export audit over HTTP: %w", err)}
	}
	defer resp.Body.Close()
	rb, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if resp.StatusCode/100 == 2 {
		var r collogspb.ExportLogsServiceResponse
		if proto.Unmarshal(rb, &r) == nil {
			return r.GetPartialSuccess().GetRejectedLogRecords(), nil
		}
		return 0, nil
	}
	e := &shipError{err: fmt.Errorf("export audit over HTTP: %s", resp.Status)}
	switch resp.StatusCode {
	case http.StatusTooManyRequests, http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout:
		if s, err := strconv.Atoi(resp.Header.Get("Retry-After")); err == nil && s > 0 {
			e.after = time.Duration(s) * time.Second
		}
	case http.StatusBadRequest, http.StatusRequestEntityTooLarge:
		e.permanent = true
	}
	return 0, e
}

func (s *httpSender) close() error {
	s.client.CloseIdleConnections()
	return nil
}

var errShipClosed = errors.New("shipper closed")
