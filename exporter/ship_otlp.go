package exporter

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"time"

	collogspb "go.opentelemetry.io/proto/otlp/collector/logs/v1"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// shipScope is the instrumentation scope of the shipped log records.
const shipScope = "github.com/pgward/pgward/exporter/audit"

// shipSender sends one export request, encoded (shipBatch); it reports how
// many records the collector rejected for good (partial success).
type shipSender interface {
	send(ctx context.Context, req []byte) (rejected int64, err error)
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
	return &grpcSender{conn: conn, md: md}, nil
}

type grpcSender struct {
	conn *grpc.ClientConn
	md   metadata.MD
}

// shipExportMethod is LogsService.Export (collector/logs/v1).
const shipExportMethod = "/opentelemetry.proto.collector.logs.v1.LogsService/Export"

// rawCodec sends a request already encoded (shipBatch) as it is and decodes
// the answer with the generated types. Its name is proto's: the content type
// stays application/grpc+proto.
type rawCodec struct{}

type rawRequest []byte

func (rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	r, ok := v.(rawRequest)
	if !ok {
		return nil, fmt.Errorf("rawCodec: cannot marshal %T", v)
	}
	return mem.BufferSlice{mem.SliceBuffer(r)}, nil
}

func (rawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	m, ok := v.(proto.Message)
	if !ok {
		return fmt.Errorf("rawCodec: cannot unmarshal into %T", v)
	}
	return proto.Unmarshal(data.Materialize(), m)
}

func (rawCodec) Name() string { return "proto" }

func (s *grpcSender) send(ctx context.Context, req []byte) (int64, error) {
	if s.md != nil {
		ctx = metadata.NewOutgoingContext(ctx, s.md)
	}
	resp := new(collogspb.ExportLogsServiceResponse)
	err := s.conn.Invoke(ctx, shipExportMethod, rawRequest(req), resp, grpc.ForceCodecV2(rawCodec{}))
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

func (s *httpSender) send(ctx context.Context, req []byte) (int64, error) {
	hr, err := http.NewRequestWithContext(ctx, http.MethodPost, s.url, bytes.NewReader(req))
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
