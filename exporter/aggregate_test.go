package exporter_test

import (
	"context"
	"strings"
	"testing"

	"github.com/pgward/pgward/broker"
	"github.com/pgward/pgward/exporter"
)

// Refusals beyond the allowance of their caller and reason become counts in
// db.refusal.summary events; every refusal is in the trail exactly once
// (full, or counted), callers and reasons are kept apart, the chain holds,
// and the metrics count every attempt.
func TestRefusalSummaries(t *testing.T) {
	fx := newFixture(t, exporter.AuditConfig{})
	ctx := context.Background()
	const logins, cancels, slots = 50, 40, 30
	for range logins {
		s := testSession()
		s.Success, s.Code, s.Error, s.Refusal = false, "28000", "no grant", broker.ReasonUnauthorized
		if err := fx.obs.SessionStart(ctx, s); err != nil {
			t.Fatal(err)
		}
	}
	// Another caller's refusals have an allowance of their own.
	other := testSession()
	other.Identity.UID, other.Identity.Cgroup = 1002, "/system.slice/other.service"
	other.Success, other.Code, other.Error, other.Refusal = false, "28000", "no grant", broker.ReasonUnauthorized
	if err := fx.obs.SessionStart(ctx, other); err != nil {
		t.Fatal(err)
	}
	caller := testSession().Identity
	for range cancels {
		fx.obs.Cancel(ctx, &broker.CancelEvent{Caller: caller, Reason: "unknown_key"})
	}
	for range slots {
		fx.obs.SlotRefused(ctx, &broker.SlotRefusal{Reason: broker.SlotPerUID, Limit: 16, Peer: caller, PeerKnown: true})
	}
	if got := metricValue(t, fx.reg, "pgward_connections_refused_total", "reason", "per_uid"); got != slots {
		t.Errorf("connections_refused_total{per_uid} = %v, want %d", got, slots)
	}
	if got := metricValue(t, fx.reg, "pgward_cancel_requests_total", "outcome", "rejected"); got != cancels {
		t.Errorf("cancel_requests_total{rejected} = %v, want %d", got, cancels)
	}
	fx.obs.Close() // writes the pending summaries
	if _, err := exporter.VerifyFiles(fx.path); err != nil {
		t.Fatal(err)
	}
	full := map[string]int{}
	counted := map[string]int{}
	for _, ev := range readLines(t, fx.path) {
		switch ev["event"] {
		case "db.session.start", "db.session.cancel":
			full[ev["event"].(string)+"/"+ev["db_user"].(string)]++
		case "db.refusal.summary":
			if ev["code"] != exporter.CodeRefusalSummary || ev["success"] != false || ev["first_time"] == nil || ev["interval_s"] != 10.0 {
				t.Errorf("summary %v", ev)
			}
			key := ev["refused"].(string) + "/" + ev["reason"].(string)
			counted[key] += int(ev["count"].(float64))
			if ev["caller_uid"] != 1001.0 || ev["caller_cgroup"] != "/system.slice/billing.service" {
				t.Errorf("summary of %s names caller %v %v", key, ev["caller_uid"], ev["caller_cgroup"])
			}
		}
	}
	// 10 full events per caller and reason (the test runs well within a second).
	if full["db.session.start/orders_rw"] != 11 || counted["db.session.start/unauthorized"] != logins-10 {
		t.Errorf("logins: %d full (want 10 + 1 of the other caller), %d counted (want %d)", full["db.session.start/orders_rw"], counted["db.session.start/unauthorized"], logins-10)
	}
	if full["db.session.cancel/"] != 10 || counted["db.session.cancel/unknown_key"] != cancels-10 {
		t.Errorf("cancels: %d full, %d counted; want 10 and %d", full["db.session.cancel/"], counted["db.session.cancel/unknown_key"], cancels-10)
	}
	if counted["connection/per_uid"] != slots {
		t.Errorf("slot refusals counted %d, want every one (%d): they have no event of their own", counted["connection/per_uid"], slots)
	}
	want := float64(logins - 10 + cancels - 10 + slots)
	if got := metricValue(t, fx.reg, "pgward_audit_refusals_summarized_total"); got != want {
		t.Errorf("audit_refusals_summarized_total = %v, want %v", got, want)
	}
	if got := metricValue(t, fx.reg, "pgward_audit_events_total", "event", "db.refusal.summary"); got != 3 {
		t.Errorf("audit_events_total{db.refusal.summary} = %v, want 3", got)
	}
}

// The free-space gauges are there and sane for a real file system.
func TestAuditFreeSpaceGauges(t *testing.T) {
	fx := newFixture(t, exporter.AuditConfig{MinFreeBytes: 1 << 62})
	if free := metricValue(t, fx.reg, "pgward_audit_free_bytes"); free <= 0 {
		t.Errorf("audit_free_bytes = %v", free)
	}
	if min := metricValue(t, fx.reg, "pgward_audit_min_free_bytes"); min != 1<<62 {
		t.Errorf("audit_min_free_bytes = %v", min)
	}
	if s := metricValue(t, fx.reg, "pgward_audit_seconds_until_full"); s <= 0 {
		t.Errorf("audit_seconds_until_full = %v", s)
	}
	// Below the floor from the start: warned at once.
	if !strings.Contains(fx.logs.String(), "below audit.min_free_bytes") {
		t.Errorf("no warning below the floor: %s", fx.logs.String())
	}
}
