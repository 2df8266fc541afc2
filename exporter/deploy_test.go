package exporter_test

import (
	"encoding/json"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"gopkg.in/yaml.v3"

	"github.com/pgward/pgward/exporter"
)

var metricRef = regexp.MustCompile(`\bpgward_[a-z0-9_]+`)

// registeredMetrics returns the names of every metric family a fully used
// registry exposes, with histogram series names (_bucket, _sum, _count).
func registeredMetrics(t *testing.T) map[string]bool {
	t.Helper()
	reg := prometheus.NewRegistry()
	// Labelled metrics are gathered once they have a series.
	exporter.NewMetrics(reg).ClientCert("orders", "orders_rw", true, false, time.Now())
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, mf := range mfs {
		names[mf.GetName()] = true
		if mf.GetType().String() == "HISTOGRAM" {
			for _, s := range []string{"_bucket", "_sum", "_count"} {
				names[mf.GetName()+s] = true
			}
		}
	}
	return names
}

func TestGrafanaDashboard(t *testing.T) {
	var dash struct {
		Title, UID string
		Panels     []struct {
			Type, Title string
			Targets     []struct{ Expr, RefID string }
		}
	}
	raw := mustRead(t, filepath.Join("..", "deploy", "grafana", "pgward.json"))
	if err := json.Unmarshal(raw, &dash); err != nil {
		t.Fatalf("dashboard JSON: %v", err)
	}
	if dash.Title == "" || dash.UID == "" {
		t.Error("dashboard has no title or uid")
	}
	known := registeredMetrics(t)
	used := map[string]bool{}
	for _, p := range dash.Panels {
		if p.Type == "row" {
			continue
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, tg := range p.Targets {
			refs := metricRef.FindAllString(tg.Expr, -1)
			if len(refs) == 0 {
				t.Errorf("panel %q query %q references no pgward metric", p.Title, tg.Expr)
			}
			if strings.Count(tg.Expr, "(") != strings.Count(tg.Expr, ")") {
				t.Errorf("panel %q query %q: unbalanced parentheses", p.Title, tg.Expr)
			}
			for _, m := range refs {
				used[strings.TrimSuffix(strings.TrimSuffix(strings.TrimSuffix(m, "_bucket"), "_sum"), "_count")] = true
				if !known[m] {
					t.Errorf("panel %q uses %s, which pgward does not export", p.Title, m)
				}
			}
		}
	}
	// The dashboard covers what the issue asks for.
	for _, m := range []string{"pgward_sessions_active", "pgward_request_duration_seconds", "pgward_auth_failures_total",
		"pgward_identity_matching_failures_total", "pgward_password_retrieval_unauthorized_total",
		"pgward_direct_connects_total", "pgward_audit_write_failures_total", "pgward_ebpf_probes_attached"} {
		if !used[m] {
			t.Errorf("dashboard shows no %s", m)
		}
	}
}

func TestAlertRules(t *testing.T) {
	dir := filepath.Join("..", "deploy", "prometheus")
	var rules struct {
		Groups []struct {
			Rules []struct{ Alert, Expr string }
		}
	}
	if err := yaml.Unmarshal(mustRead(t, filepath.Join(dir, "alerts.yaml")), &rules); err != nil {
		t.Fatal(err)
	}
	var tests struct {
		Tests []struct {
			AlertRuleTest []struct {
				Alertname string `yaml:"alertname"`
				ExpAlerts []any  `yaml:"exp_alerts"`
			} `yaml:"alert_rule_test"`
		}
	}
	if err := yaml.Unmarshal(mustRead(t, filepath.Join(dir, "alerts_test.yaml")), &tests); err != nil {
		t.Fatal(err)
	}
	fires, quiet := map[string]bool{}, map[string]bool{}
	for _, tc := range tests.Tests {
		for _, a := range tc.AlertRuleTest {
			if len(a.ExpAlerts) > 0 {
				fires[a.Alertname] = true
			} else {
				quiet[a.Alertname] = true
			}
		}
	}
	known := registeredMetrics(t)
	var alerts []string
	for _, g := range rules.Groups {
		for _, r := range g.Rules {
			alerts = append(alerts, r.Alert)
			if !fires[r.Alert] || !quiet[r.Alert] {
				t.Errorf("alert %s needs a unit test where it fires and one where it does not", r.Alert)
			}
			for _, m := range metricRef.FindAllString(r.Expr, -1) {
				if !known[m] {
					t.Errorf("alert %s uses %s, which pgward does not export", r.Alert, m)
				}
			}
		}
	}
	for _, want := range []string{"PgwardIdentityMatchingFailures", "PgwardUnauthorizedRetrievals", "PgwardAuthFailureSpike",
		"PgwardAuditWriteFailures", "PgwardEBPFProbesDetached"} {
		if !slices.Contains(alerts, want) {
			t.Errorf("no alert %s", want)
		}
	}

	pt := promtool(t)
	for _, args := range [][]string{{"check", "rules", "alerts.yaml"}, {"test", "rules", "alerts_test.yaml"}} {
		cmd := exec.Command(pt, args...)
		cmd.Dir = dir
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
}
