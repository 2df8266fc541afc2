package exporter_test

import (
	"strings"
	"testing"
	"time"

	"github.com/pgward/pgward/exporter"
)

// audit.otlp keys win; what they leave out comes from OTEL_EXPORTER_OTLP_LOGS_*,
// then OTEL_EXPORTER_OTLP_*; bad values are reported with the key or variable.
func TestShipConfigEnvFallback(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  *exporter.ShipConfig
		env  map[string]string
		on   bool
		err  string // substring; "" = valid
	}{
		{name: "off", cfg: nil, env: map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, on: false},
		{name: "logs endpoint turns it on", env: map[string]string{"OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": "http://c:4318/v1/logs", "OTEL_EXPORTER_OTLP_LOGS_PROTOCOL": "http/protobuf"}, on: true},
		{name: "section with generic env", cfg: &exporter.ShipConfig{}, env: map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "https://c:4317", "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20x,x-tenant=a", "OTEL_EXPORTER_OTLP_TIMEOUT": "2500"}, on: true},
		{name: "config wins", cfg: &exporter.ShipConfig{Endpoint: "c:4317", Timeout: time.Second}, env: map[string]string{"OTEL_EXPORTER_OTLP_TIMEOUT": "nope"}, on: true},
		{name: "no endpoint", cfg: &exporter.ShipConfig{}, on: true, err: "audit.otlp.endpoint: required"},
		{name: "not host:port", cfg: &exporter.ShipConfig{Endpoint: "http://c"}, on: true, err: "is not host:port"},
		{name: "bad protocol", cfg: &exporter.ShipConfig{Endpoint: "c:1", Protocol: "thrift"}, on: true, err: "audit.otlp.protocol"},
		{name: "bad timeout env", cfg: &exporter.ShipConfig{Endpoint: "c:1"}, env: map[string]string{"OTEL_EXPORTER_OTLP_LOGS_TIMEOUT": "soon"}, on: true, err: "OTEL_EXPORTER_OTLP_TIMEOUT"},
		{name: "bad headers env", cfg: &exporter.ShipConfig{Endpoint: "c:1"}, env: map[string]string{"OTEL_EXPORTER_OTLP_HEADERS": "secretvalue"}, on: true, err: "not key=value"},
		{name: "missing ca", cfg: &exporter.ShipConfig{Endpoint: "c:1", CAFile: "/nonexistent/ca.pem"}, on: true, err: "audit.otlp.ca_file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, k := range []string{"ENDPOINT", "PROTOCOL", "INSECURE", "HEADERS", "CERTIFICATE", "TIMEOUT"} {
				t.Setenv("OTEL_EXPORTER_OTLP_"+k, "")
				t.Setenv("OTEL_EXPORTER_OTLP_LOGS_"+k, "")
			}
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			if got := exporter.ShipEnabled(tc.cfg, nil); got != tc.on {
				t.Fatalf("ShipEnabled = %v, want %v", got, tc.on)
			}
			if !tc.on {
				return
			}
			err := exporter.AuditConfig{Path: "/tmp/x", OTLP: tc.cfg}.Validate()
			switch {
			case tc.err == "" && err != nil:
				t.Fatalf("unexpected error: %v", err)
			case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
				t.Fatalf("error %v, want one containing %q", err, tc.err)
			case err != nil && strings.Contains(err.Error(), "secretvalue"):
				t.Fatalf("error quotes a header value: %v", err)
			}
		})
	}
}
