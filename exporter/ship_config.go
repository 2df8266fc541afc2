package exporter

import (
	"errors"
	"fmt"
	"maps"
	"net"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Shipping protocols (audit.otlp.protocol, OTEL_EXPORTER_OTLP_LOGS_PROTOCOL).
const (
	ShipGRPC = "grpc"
	ShipHTTP = "http/protobuf"
)

// Defaults of ShipConfig.
const (
	DefaultShipTimeout = 10 * time.Second
	// DefaultShipMaxUndelivered is the cap on rotated audit files kept only
	// because the collector has not acknowledged them yet (beyond
	// audit.max_files): 1 GiB.
	DefaultShipMaxUndelivered = 1 << 30
)

// ShipConfig is `audit.otlp:`: ship every audit line, at least once, as an
// OTLP log record to an OpenTelemetry Collector. The audit file is the
// spool: the shipper reads behind the writer and never slows a statement.
// A field left empty takes its value from OTEL_EXPORTER_OTLP_LOGS_* and then
// OTEL_EXPORTER_OTLP_* (endpoint, protocol, insecure, headers, certificate,
// timeout), as the OpenTelemetry SDKs do.
type ShipConfig struct {
	// Endpoint is host:port of the collector's OTLP receiver (4317 for
	// gRPC, 4318 for HTTP by convention).
	Endpoint string `yaml:"endpoint"`
	// Protocol is grpc (default) or http/protobuf.
	Protocol string `yaml:"protocol"`
	// Insecure sends in plain text; the default is TLS.
	Insecure *bool `yaml:"insecure"`
	// Headers are sent with every export (gRPC metadata or HTTP headers),
	// e.g. an Authorization token. Their values are never logged.
	Headers map[string]string `yaml:"headers"`
	// CAFile verifies the collector's certificate (default: system roots).
	CAFile string `yaml:"ca_file"`
	// Timeout bounds one export attempt; 0 means DefaultShipTimeout.
	Timeout time.Duration `yaml:"timeout"`
	// MaxUndeliveredBytes caps the rotated audit files kept past
	// audit.max_files because they are not delivered yet; beyond it the
	// oldest is deleted and its undelivered events are counted in
	// pgward_audit_ship_lost_events_total. 0 means DefaultShipMaxUndelivered.
	MaxUndeliveredBytes int64 `yaml:"max_undelivered_bytes"`
	// StatePath is where the delivery cursor is kept; default
	// <audit.path>.ship.
	StatePath string `yaml:"state_path"`

	// urlPath is the HTTP path (/v1/logs unless an endpoint URL says more).
	urlPath string
}

// shipEnv reads the variable of the OTLP logs exporter, then the generic one.
func shipEnv(getenv func(string) string, name string) string {
	if v := getenv("OTEL_EXPORTER_OTLP_LOGS_" + name); v != "" {
		return v
	}
	return getenv("OTEL_EXPORTER_OTLP_" + name)
}

// ShipEnabled reports whether audit shipping is configured: an audit.otlp
// section, or OTEL_EXPORTER_OTLP_LOGS_ENDPOINT in the environment. The
// generic OTEL_EXPORTER_OTLP_ENDPOINT alone (which also sends traces) does
// not turn it on.
func ShipEnabled(c *ShipConfig, getenv func(string) string) bool {
	if getenv == nil {
		getenv = os.Getenv
	}
	return c != nil || getenv("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT") != ""
}

// resolve fills empty fields from the environment and defaults and reports
// every problem, naming the key (a *broker.FieldError, to which the agent
// adds the file and line) or the environment variable.
func (c ShipConfig) resolve(getenv func(string) string) (ShipConfig, error) {
	if getenv == nil {
		getenv = os.Getenv
	}
	var errs []error
	// key names a problem of the value at audit.otlp.<k>, or, when the
	// value came from the environment, the variable's.
	key := func(k, env string, fromEnv bool, format string, args ...any) {
		if fromEnv {
			errs = append(errs, fmt.Errorf("%s (for audit.otlp.%s): %s", env, k, fmt.Sprintf(format, args...)))
			return
		}
		errs = append(errs, fieldError("audit.otlp."+k, format, args...))
	}
	protoEnv := c.Protocol == ""
	if c.Protocol == "" {
		c.Protocol = shipEnv(getenv, "PROTOCOL")
	}
	if c.Protocol == "" {
		c.Protocol = ShipGRPC
	}
	switch c.Protocol {
	case ShipGRPC, ShipHTTP:
	default:
		key("protocol", "OTEL_EXPORTER_OTLP_PROTOCOL", protoEnv, "%q is not one of grpc, http/protobuf", c.Protocol)
	}
	c.urlPath = "/v1/logs"
	endpointEnv := c.Endpoint == ""
	if c.Endpoint == "" {
		name := "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT"
		raw := getenv(name)
		if raw == "" {
			name, raw = "OTEL_EXPORTER_OTLP_ENDPOINT", getenv("OTEL_EXPORTER_OTLP_ENDPOINT")
		}
		if raw != "" {
			u, err := url.Parse(raw)
			switch {
			case err != nil || u.Host == "":
				errs = append(errs, fmt.Errorf("%s: %q is not a URL such as http://collector:4317", name, raw))
			default:
				c.Endpoint = u.Host
				if c.Insecure == nil && (u.Scheme == "http" || u.Scheme == "https") {
					ins := u.Scheme == "http"
					c.Insecure = &ins
				}
				p := strings.TrimSuffix(u.Path, "/")
				if name == "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT" && p != "" {
					c.urlPath = p // the signal's URL is used as is
				} else {
					c.urlPath = p + "/v1/logs"
				}
			}
		}
	}
	if c.Endpoint == "" {
		key("endpoint", "", false, "required (host:port of the collector's OTLP receiver), or set OTEL_EXPORTER_OTLP_LOGS_ENDPOINT")
	} else if _, port, err := net.SplitHostPort(c.Endpoint); err != nil || port == "" || strings.Contains(c.Endpoint, "/") {
		key("endpoint", "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", endpointEnv, "%q is not host:port", c.Endpoint)
	}
	if c.Insecure == nil {
		if v := shipEnv(getenv, "INSECURE"); v != "" {
			b, err := strconv.ParseBool(v)
			if err != nil {
				errs = append(errs, fmt.Errorf("OTEL_EXPORTER_OTLP_INSECURE: %q is not true or false", v))
			}
			c.Insecure = &b
		}
	}
	headersEnv := c.Headers == nil
	if c.Headers == nil {
		if v := shipEnv(getenv, "HEADERS"); v != "" {
			h, err := parseOTLPHeaders(v)
			if err != nil {
				errs = append(errs, fmt.Errorf("OTEL_EXPORTER_OTLP_HEADERS: %w", err))
			}
			c.Headers = h
		}
	}
	caEnv := c.CAFile == ""
	if c.CAFile == "" {
		c.CAFile = shipEnv(getenv, "CERTIFICATE")
	}
	if c.Timeout == 0 {
		if v := shipEnv(getenv, "TIMEOUT"); v != "" {
			ms, err := strconv.Atoi(v)
			if err != nil || ms <= 0 {
				errs = append(errs, fmt.Errorf("OTEL_EXPORTER_OTLP_TIMEOUT: %q is not a positive number of milliseconds", v))
			}
			c.Timeout = time.Duration(ms) * time.Millisecond
		}
	}
	if c.Timeout == 0 {
		c.Timeout = DefaultShipTimeout
	}
	if c.Timeout < 0 {
		key("timeout", "", false, "%v must be positive", c.Timeout)
	}
	if c.MaxUndeliveredBytes == 0 {
		c.MaxUndeliveredBytes = DefaultShipMaxUndelivered
	}
	if c.MaxUndeliveredBytes < 0 {
		key("max_undelivered_bytes", "", false, "%d must not be negative", c.MaxUndeliveredBytes)
	}
	if c.CAFile != "" {
		if _, err := shipTLS(c); err != nil {
			key("ca_file", "OTEL_EXPORTER_OTLP_CERTIFICATE", caEnv, "%s", err.Error())
		}
	}
	for _, k := range slices.Sorted(maps.Keys(c.Headers)) {
		if k == "" || strings.ContainsAny(k, " \t\r\n:") {
			key("headers", "OTEL_EXPORTER_OTLP_HEADERS", headersEnv, "%q is not a header name", k)
		}
	}
	return c, errors.Join(errs...)
}

// parseOTLPHeaders reads "k1=v1,k2=v2" with URL-encoded values (the OTel
// environment variable format). Errors never quote a value.
func parseOTLPHeaders(s string) (map[string]string, error) {
	h := map[string]string{}
	for _, kv := range strings.Split(s, ",") {
		if strings.TrimSpace(kv) == "" {
			continue
		}
		k, v, ok := strings.Cut(kv, "=")
		k = strings.TrimSpace(k)
		if !ok || k == "" {
			return nil, fmt.Errorf("entry %d is not key=value", len(h)+1)
		}
		dv, err := url.QueryUnescape(strings.TrimSpace(v))
		if err != nil {
			return nil, fmt.Errorf("value of %q is not URL-encoded", k)
		}
		h[k] = dv
	}
	return h, nil
}

func (c ShipConfig) insecure() bool { return c.Insecure != nil && *c.Insecure }
