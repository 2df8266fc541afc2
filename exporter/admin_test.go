package exporter_test

import (
	"context"
	"strings"
	"testing"

	"github.com/pgward/pgward/broker"
	"github.com/pgward/pgward/exporter"
)

// adminEvents writes one admin event of every code (docs/audit-events.md
// shows their lines; TestAuditDocExamples checks them).
func adminEvents(t testing.TB, fx *fixture, s *broker.SessionInfo) {
	t.Helper()
	ctx := context.Background()
	op := broker.Identity{PID: 7301, UID: 0, GID: 0, User: "root", Exe: "/usr/local/bin/pgward", Comm: "pgward",
		Cgroup: "/user.slice/user-0.slice/session-9.scope", Pinned: true}
	nobody := broker.Identity{PID: 7302, UID: 1002, GID: 1002, User: "mallory", Exe: "/usr/local/bin/pgward", Comm: "pgward",
		Cgroup: "/user.slice/user-1002.slice/session-4.scope", Pinned: true}
	target := &broker.SessionStatus{SessionID: s.SessionID, RequestID: s.RequestID, Principal: s.Principal,
		Upstream: s.Upstream, Database: s.Database, URI: s.URI, Role: s.User, Process: s.Identity}
	for _, e := range []exporter.AdminEvent{
		{Event: exporter.EventAdminSessionsList, RequestID: "c2b7e0d4a9f14e6b8d3a5f7e1c0b9a82", Operator: op, Count: 12, Success: true},
		{Event: exporter.EventAdminSessionsList, RequestID: "e4d1c8b2a7f0493e9b6c5d4e3f2a1b0c", Operator: nobody,
			Error: "needs root: the admin API serves uid 0 only, and the caller runs as uid 1002"},
		{Event: exporter.EventAdminSessionsEnd, RequestID: "7a9c3e5f1b2d4e6f8a0b1c2d3e4f5a6b", Operator: op, Session: target, TargetSID: s.SessionID,
			Reason: "INC-2231: runaway report", Success: true},
		{Event: exporter.EventAdminSessionsEnd, RequestID: "7a9c3e5f1b2d4e6f8a0b1c2d3e4f5a6b", Operator: op, TargetSID: "0f6e2a4c-9b1d-4e3f-8a7c-5d2b1e0f9a38",
			Reason: "INC-2231: runaway report", Error: "no live session has this id"},
	} {
		if err := fx.obs.Admin(ctx, e); err != nil {
			t.Fatal(err)
		}
	}
}

// Admin events carry the operator as the process, the target session's
// fields, the reason, and a code per outcome; a refusal is logged at WARN.
func TestAdminEvents(t *testing.T) {
	fx := newFixture(t, exporter.AuditConfig{})
	s := testSession()
	adminEvents(t, fx, s)
	lines := readLines(t, fx.path)
	if len(lines) != 4 {
		t.Fatalf("%d lines", len(lines))
	}
	want := []struct{ event, code, sid string }{
		{"admin.sessions.list", "PGW09I", ""},
		{"admin.sessions.list", "PGW09W", ""},
		{"admin.sessions.end", "PGW10I", s.SessionID},
		{"admin.sessions.end", "PGW10W", "0f6e2a4c-9b1d-4e3f-8a7c-5d2b1e0f9a38"},
	}
	for i, w := range want {
		l := lines[i]
		if l["event"] != w.event || l["code"] != w.code || l["sid"] != w.sid {
			t.Errorf("line %d: %v", i, l)
		}
	}
	if p := lines[2]["process"].(map[string]any); p["pid"] != float64(7301) || p["uid"] != float64(0) {
		t.Errorf("operator process: %v", p)
	}
	if l := lines[2]; l["principal"] != s.Principal || l["db_user"] != s.User || l["target_pid"] != float64(s.Identity.PID) ||
		l["target_request_id"] != s.RequestID || l["reason"] != "INC-2231: runaway report" || l["success"] != true {
		t.Errorf("end event: %v", l)
	}
	if lines[0]["sessions"] != float64(12) || lines[1]["success"] != false || !strings.Contains(lines[1]["error"].(string), "needs root") {
		t.Errorf("list events: %v / %v", lines[0], lines[1])
	}
	if logs := fx.logs.String(); !strings.Contains(logs, `"level":"WARN","msg":"admin action refused or failed"`) {
		t.Errorf("refusal not logged at WARN: %s", logs)
	}
}

// RedactStatement hides password literals, also one cut short.
func TestAdminRedactStatement(t *testing.T) {
	for in, want := range map[string]string{
		"select 1":                                     "select 1",
		"ALTER ROLE x PASSWORD 'hunter2'":              "ALTER ROLE x PASSWORD '[REDACTED]'",
		"ALTER ROLE x PASSWORD 'hunter2 and more…":     "ALTER ROLE x PASSWORD '[REDACTED]'",
		"select * from users where password_hash = $1": "select * from users where password_hash = $1",
	} {
		if got := exporter.RedactStatement(in); got != want {
			t.Errorf("RedactStatement(%q) = %q, want %q", in, got, want)
		}
	}
}
