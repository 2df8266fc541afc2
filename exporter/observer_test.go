package exporter_test

import (
	"bufio"
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/pgward/pgward/broker"
	"github.com/pgward/pgward/exporter"
)

func TestObserverAuthMetrics(t *testing.T) {
	ok := broker.Check{Attempted: true, OK: true}
	bad := broker.Check{Attempted: true}
	tests := []struct {
		name string
		r    broker.AuthRequest
		want map[string]float64 // metric (with label after '|') → value
	}{
		{"success", broker.AuthRequest{Verification: ok, Retrieval: ok,
			Durations: map[broker.Stage]time.Duration{broker.StageTotal: 3 * time.Millisecond, broker.StageIdentity: time.Millisecond}},
			map[string]float64{"pgward_requests_total": 1, "pgward_responses_total": 1, "pgward_error_responses_total": 0,
				"pgward_identity_verification_attempts_total": 1, "pgward_identity_verification_failures_total": 0,
				"pgward_password_retrieval_attempts_total": 1, "pgward_request_duration_seconds|stage=total": 1,
				"pgward_request_duration_seconds|stage=identity": 1, "pgward_request_duration_seconds|stage=credentials": 0}},
		{"identity failure", broker.AuthRequest{Verification: bad, Failure: broker.ReasonIdentity},
			map[string]float64{"pgward_error_responses_total": 1, "pgward_identity_verification_failures_total": 1,
				"pgward_auth_failures_total|reason=identity": 1, "pgward_password_retrieval_attempts_total": 0}},
		{"claim mismatch", broker.AuthRequest{Verification: ok, Matching: bad, Failure: broker.ReasonIdentity},
			map[string]float64{"pgward_identity_matching_attempts_total": 1, "pgward_identity_matching_failures_total": 1}},
		{"unauthorized", broker.AuthRequest{Verification: ok, Unauthorized: true, Failure: broker.ReasonUnauthorized},
			map[string]float64{"pgward_password_retrieval_attempts_total": 1, "pgward_password_retrieval_unauthorized_total": 1,
				"pgward_password_retrieval_failures_total": 0, "pgward_auth_failures_total|reason=unauthorized": 1}},
		{"backend error", broker.AuthRequest{Verification: ok, Retrieval: bad, Failure: broker.ReasonBackendError},
			map[string]float64{"pgward_password_retrieval_failures_total": 1, "pgward_auth_failures_total|reason=backend_error": 1}},
		{"unknown reason stays bounded", broker.AuthRequest{Failure: "new_reason"},
			map[string]float64{"pgward_auth_failures_total|reason=other": 1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fx := newFixture(t, exporter.AuditConfig{})
			tt.r.RequestID = "0af7651916cd43dd8448eb211c80319c"
			ctx, ro := fx.obs.Begin(context.Background(), &broker.Request{RequestID: tt.r.RequestID})
			if tt.r.Failure == "" {
				if _, err := ro.Started(ctx, &tt.r, testSession()); err != nil {
					t.Fatal(err)
				}
			} else {
				ro.Refused(ctx, &tt.r, nil)
			}
			for k, want := range tt.want {
				name, label, _ := strings.Cut(k, "|")
				var labels []string
				if label != "" {
					ln, lv, _ := strings.Cut(label, "=")
					labels = []string{ln, lv}
				}
				if got := metricValue(t, fx.reg, name, labels...); got != want {
					t.Errorf("%s = %v, want %v", k, got, want)
				}
			}
			if tt.r.Failure != "" && !strings.Contains(fx.logs.String(), `"reason":"`+string(tt.r.Failure)+`"`) {
				t.Errorf("refusal not logged with its reason:\n%s", fx.logs)
			}
		})
	}
}

// logLines parses the JSON log.
func logLines(t *testing.T, s string) []map[string]any {
	t.Helper()
	var out []map[string]any
	sc := bufio.NewScanner(strings.NewReader(s))
	for sc.Scan() {
		var v map[string]any
		if err := json.Unmarshal(sc.Bytes(), &v); err != nil {
			t.Fatalf("log line %q: %v", sc.Text(), err)
		}
		out = append(out, v)
	}
	return out
}

func TestObserverLogsAndSessionMetrics(t *testing.T) {
	fx := newFixture(t, exporter.AuditConfig{})
	ctx := context.Background()
	s := testSession()
	if err := fx.obs.SessionStart(ctx, s); err != nil {
		t.Fatal(err)
	}
	if got := metricValue(t, fx.reg, "pgward_sessions_active"); got != 1 {
		t.Errorf("sessions_active = %v, want 1", got)
	}
	q := &broker.QueryEvent{Index: 1, Text: "SELECT 1", Rows: 1, Success: true}
	if err := fx.obs.Query(ctx, s, q); err != nil {
		t.Fatal(err)
	}
	fx.obs.QueryDone(ctx, s, q)
	fx.obs.RelayBytes(true, 10)
	fx.obs.RelayBytes(false, 300)
	// A forged cancel key from another process.
	intruder := broker.Identity{PID: 6666, UID: 1002, Exe: "/tmp/x"}
	fx.obs.Cancel(ctx, &broker.CancelEvent{RequestID: "7d2f0c6a5e1b4c3d9e8f7a6b5c4d3e2f", Caller: intruder, Reason: "unknown_key"})
	s.EndReason = "client_closed"
	fx.obs.SessionEnd(ctx, s)
	fx.obs.DirectConnect(ctx, exporter.DirectConnectEvent{Process: intruder, Dest: "db.internal:5432"})

	for metric, want := range map[string]float64{
		"pgward_sessions_active": 0, "pgward_sessions_total": 1, "pgward_queries_total": 1,
		"pgward_relay_bytes_total|direction=client_to_upstream": 10,
		"pgward_relay_bytes_total|direction=upstream_to_client": 300,
		"pgward_cancel_requests_total|outcome=rejected":         1,
		"pgward_cancel_requests_total|outcome=forwarded":        0,
		"pgward_direct_connects_total|blocked=false":            1,
		"pgward_audit_events_total|event=db.connect.direct":     1,
	} {
		name, label, _ := strings.Cut(metric, "|")
		var labels []string
		if label != "" {
			ln, lv, _ := strings.Cut(label, "=")
			labels = []string{ln, lv}
		}
		if got := metricValue(t, fx.reg, name, labels...); got != want {
			t.Errorf("%s = %v, want %v", metric, got, want)
		}
	}

	lines := logLines(t, fx.logs.String())
	if len(lines) < 6 {
		t.Fatalf("only %d log lines:\n%s", len(lines), fx.logs)
	}
	var warns []string
	for _, l := range lines {
		// Every line about a request carries its request_id; the direct
		// connect has no request and carries the process instead.
		if l["msg"] != "direct connect to a guarded database endpoint" {
			if id, _ := l["request_id"].(string); id == "" {
				t.Errorf("log line without request_id: %v", l)
			}
		}
		if l["sid"] != nil && (l["pid"] != 4242.0 || l["uid"] != 1001.0 || l["principal"] != "billing") {
			t.Errorf("session log line lacks pid/uid/principal: %v", l)
		}
		if l["level"] == "WARN" {
			warns = append(warns, l["msg"].(string))
			if l["process"] == nil {
				t.Errorf("WARN without the caller's identity as evidence: %v", l)
			}
		}
	}
	want := []string{"cancel request rejected", "direct connect to a guarded database endpoint"}
	if strings.Join(warns, "|") != strings.Join(want, "|") {
		t.Errorf("WARN lines %q, want %q", warns, want)
	}
}

// exerciseObserver drives every Observer method once, so each labelled
// series has a sample.
func exerciseObserver(t testing.TB, fx *fixture) {
	t.Helper()
	ctx := context.Background()
	s := testSession()
	ctx, ro := fx.obs.Begin(ctx, &broker.Request{RequestID: s.RequestID})
	so, err := ro.Started(ctx, &broker.AuthRequest{RequestID: s.RequestID, Verification: broker.Check{Attempted: true, OK: true},
		Durations: map[broker.Stage]time.Duration{broker.StageTotal: time.Millisecond}}, s)
	if err != nil {
		t.Fatal(err)
	}
	q := &broker.QueryEvent{Index: 1, Text: "SELECT 1", Rows: 1, Success: true}
	if err := so.Statements(ctx, []*broker.QueryEvent{q}); err != nil {
		t.Fatal(err)
	}
	so.Result(ctx, q)
	so.Bytes(true, 1)
	so.Cancel(ctx, &broker.CancelEvent{RequestID: "x", Forwarded: true, Session: s})
	so.End(ctx)
	_ = fx.obs.DirectConnect(ctx, exporter.DirectConnectEvent{Dest: "db:5432", Blocked: true})
}
