package exporter_test

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/pgward/pgward/exporter"
)

func TestNewLogger(t *testing.T) {
	tests := []struct {
		format, level string
		wantErr       string // fragment
		wantJSON      bool
		debugShown    bool
		infoShown     bool
	}{
		{"", "", "", true, false, true},
		{"json", "debug", "", true, true, true},
		{"TEXT", "warn", "", false, false, false},
		{"text", "info", "", false, false, true},
		{"xml", "", "PGWARD_LOG_FORMAT", false, false, false},
		{"", "verbose", "PGWARD_LOG_LEVEL", false, false, false},
	}
	for _, tt := range tests {
		t.Run(tt.format+"/"+tt.level, func(t *testing.T) {
			env := map[string]string{"PGWARD_LOG_FORMAT": tt.format, "PGWARD_LOG_LEVEL": tt.level}
			var buf bytes.Buffer
			log, err := exporter.NewLogger(&buf, func(k string) string { return env[k] })
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) || !strings.Contains(err.Error(), "want one of") {
					t.Fatalf("err = %v, want one naming %s and the allowed values", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			log.Debug("dbg", "request_id", "r1")
			log.Info("inf", "request_id", "r1")
			out := buf.String()
			if got := strings.Contains(out, "dbg"); got != tt.debugShown {
				t.Errorf("debug shown = %v, want %v", got, tt.debugShown)
			}
			if got := strings.Contains(out, "inf"); got != tt.infoShown {
				t.Errorf("info shown = %v, want %v", got, tt.infoShown)
			}
			if tt.infoShown {
				if isJSON := strings.HasPrefix(out, "{"); isJSON != tt.wantJSON {
					t.Errorf("output %q: json = %v, want %v", out, isJSON, tt.wantJSON)
				}
			}
		})
	}
}

// Durations are logged as Go duration strings, not raw nanoseconds.
func TestLoggerDurations(t *testing.T) {
	for _, format := range []string{"json", "text"} {
		var buf bytes.Buffer
		log, err := exporter.NewLogger(&buf, func(k string) string {
			if k == "PGWARD_LOG_FORMAT" {
				return format
			}
			return ""
		})
		if err != nil {
			t.Fatal(err)
		}
		log.Info("draining sessions", "grace", 30*time.Second, "took", 1500*time.Millisecond)
		out := buf.String()
		if !strings.Contains(out, "30s") || !strings.Contains(out, "1.5s") || strings.Contains(out, "30000000000") {
			t.Fatalf("%s: %s", format, out)
		}
	}
}
