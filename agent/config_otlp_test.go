package agent

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Problems of audit.otlp keys carry file:line like every other key; a value
// taken from the environment names its variable instead.
func TestParseConfigOTLPLines(t *testing.T) {
	for _, k := range []string{"ENDPOINT", "PROTOCOL", "INSECURE", "HEADERS", "CERTIFICATE", "TIMEOUT"} {
		t.Setenv("OTEL_EXPORTER_OTLP_"+k, "")
		t.Setenv("OTEL_EXPORTER_OTLP_LOGS_"+k, "")
	}
	notPEM := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(notPEM, []byte("not a certificate\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, yaml string
		env        map[string]string
		want       []string
		not        []string
	}{
		{name: "keys", yaml: `upstreams:
  orders: { address: /run/pg/.s.PGSQL.5432 }
audit:
  path: /var/log/pgward/audit.jsonl
  otlp:
    endpoint: http://collector
    protocol: thrift
    timeout: -1s
    max_undelivered_bytes: -5
    ca_file: ` + notPEM + `
    headers:
      "bad key": x
`, want: []string{
			"pgward.yaml:6: audit.otlp.endpoint: \"http://collector\" is not host:port",
			"pgward.yaml:7: audit.otlp.protocol",
			"pgward.yaml:8: audit.otlp.timeout",
			"pgward.yaml:9: audit.otlp.max_undelivered_bytes",
			"pgward.yaml:10: audit.otlp.ca_file: " + notPEM + ": no PEM certificate",
			"pgward.yaml:11: audit.otlp.headers: \"bad key\" is not a header name",
		}},
		{name: "missing endpoint points at the section", yaml: `upstreams:
  orders: { address: /run/pg/.s.PGSQL.5432 }
audit:
  path: /var/log/pgward/audit.jsonl
  otlp:
    insecure: true
`, want: []string{"pgward.yaml:5: audit.otlp.endpoint: required"}},
		{name: "from the environment", yaml: `upstreams:
  orders: { address: /run/pg/.s.PGSQL.5432 }
audit:
  path: /var/log/pgward/audit.jsonl
  otlp: {}
`, env: map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "thrift"},
			want: []string{"OTEL_EXPORTER_OTLP_PROTOCOL (for audit.otlp.protocol)"}, not: []string{"pgward.yaml:5: audit.otlp.protocol"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			_, err := ParseConfig([]byte(tc.yaml), "pgward.yaml")
			if err == nil {
				t.Fatal("accepted")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("missing %q in:\n%v", w, err)
				}
			}
			for _, w := range tc.not {
				if strings.Contains(err.Error(), w) {
					t.Errorf("%q in:\n%v", w, err)
				}
			}
		})
	}
}
