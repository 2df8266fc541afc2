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

// auditLineFields is what the shipper reads of an audit line to set the
// record's attributes; the body is the line itself.
type auditLineFields struct {
	Event     string `json:"event"`
	Time      string `json:"time"`
	UID       string `json:"uid"`
	SID       string `json:"sid"`
	RequestID string `json:"request_id"`
	SpanID    string `json:"span_id"`
	DBName    string `json:"db_name"`
	DBUser    string `json:"db_user"`
	DBService string `json:"db_service"`
	Principal string `json:"principal"`
	Query     string `json:"db_query"`
	SQLState  string `json:"sqlstate"`
	Success   *bool  `json:"success"`
	Rows      *int64 `json:"rows"`
	Seq       int64  `json:"seq"`
	Process   *struct {
		PID         int64  `json:"pid"`
		UID         *int64 `json:"uid"`
		User        string `json:"user"`
		Comm        string `json:"comm"`
		Exe         string `json:"exe"`
		SystemdUnit string `json:"systemd_unit"`
		ContainerID string `json:"container_id"`
		Pod         *struct {
			Namespace      string `json:"namespace"`
			Name           string `json:"name"`
			ServiceAccount string `json:"service_account"`
		} `json:"pod"`
	} `json:"process"`
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
	var f auditLineFields
	if err := json.Unmarshal(line, &f); err != nil {
		// The chain fields were readable (the spool checked them); ship the
		// line anyway, the body is what counts.
		rec.Attributes = append(rec.Attributes, strAttr("pgward.audit.file_start", fileStart))
		return rec
	}
	rec.EventName = f.Event
	if t, err := time.Parse(time.RFC3339Nano, f.Time); err == nil {
		rec.TimeUnixNano = uint64(t.UnixNano())
	}
	if id, err := hex.DecodeString(f.RequestID); err == nil && len(id) == 16 {
		rec.TraceId = id
	}
	if id, err := hex.DecodeString(f.SpanID); err == nil && len(id) == 8 {
		rec.SpanId = id
	}
	a := make([]*commonpb.KeyValue, 0, 20)
	a = append(a, strAttr("event.name", f.Event), intAttr("pgward.audit.seq", f.Seq),
		strAttr("pgward.audit.file_start", fileStart))
	if f.UID != "" {
		a = append(a, strAttr("log.record.uid", f.UID))
	}
	if f.DBService != "" || f.DBName != "" {
		a = append(a, strAttr("db.system.name", "postgresql"))
	}
	for _, kv := range [...][2]string{
		{"db.namespace", f.DBName}, {"db.query.text", f.Query}, {"db.response.status_code", f.SQLState},
		{"session.id", f.SID}, {"pgward.request_id", f.RequestID}, {"pgward.principal", f.Principal},
		{"pgward.db_user", f.DBUser}, {"pgward.db_service", f.DBService},
	} {
		if kv[1] != "" {
			a = append(a, strAttr(kv[0], kv[1]))
		}
	}
	if f.Success != nil {
		a = append(a, boolAttr("pgward.success", *f.Success))
		if !*f.Success {
			rec.SeverityNumber, rec.SeverityText = logspb.SeverityNumber_SEVERITY_NUMBER_WARN, "WARN"
			if f.SQLState != "" {
				a = append(a, strAttr("error.type", f.SQLState))
			}
		}
	}
	if f.Rows != nil {
		a = append(a, intAttr("db.response.returned_rows", *f.Rows))
	}
	if p := f.Process; p != nil {
		if p.PID != 0 {
			a = append(a, intAttr("process.pid", p.PID))
		}
		if p.UID != nil {
			a = append(a, intAttr("process.user.id", *p.UID))
		}
		for _, kv := range [...][2]string{
			{"process.executable.path", p.Exe}, {"process.executable.name", p.Comm}, {"process.owner", p.User},
			{"container.id", p.ContainerID}, {"pgward.systemd_unit", p.SystemdUnit},
		} {
			if kv[1] != "" {
				a = append(a, strAttr(kv[0], kv[1]))
			}
		}
		if pod := p.Pod; pod != nil {
			a = append(a, strAttr("k8s.pod.name", pod.Name), strAttr("k8s.namespace.name", pod.Namespace))
			if pod.ServiceAccount != "" {
				a = append(a, strAttr("k8s.serviceaccount.name", pod.ServiceAccount))
			}
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
			return nil, fmt.Errorf("audit.otlp.ca_file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("audit.otlp.ca_file %s: no PEM certificate in it", c.CAFile)
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
			return nil, err
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
