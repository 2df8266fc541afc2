package exporter_test

import (
	"io"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/pgward/pgward/broker"
	"github.com/pgward/pgward/exporter"
	"github.com/pgward/pgward/testenv"
)

// TestMetricsDocumented fails when a registered pgward_ metric is missing
// from docs/metrics.md, or the doc names a metric that does not exist.
func TestMetricsDocumented(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := exporter.NewMetrics(reg)
	// A labelled metric without a series yet is not gathered: give the
	// per-credential gauge one.
	exporter.NewObserver(nil, m, nil).CredentialRoles("orders", "orders_rw", broker.RoleMemberships{})
	// and the client certificate's metrics.
	m.ClientCert("orders", "orders_rw", true, false, time.Now())
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	doc := string(mustRead(t, filepath.Join("..", "docs", "metrics.md")))
	registered := map[string]bool{}
	for _, mf := range mfs {
		name := mf.GetName()
		if !strings.HasPrefix(name, "pgward_") {
			continue
		}
		registered[name] = true
		if !strings.Contains(doc, "`"+name+"`") {
			t.Errorf("metric %s is not documented in docs/metrics.md", name)
		}
	}
	for _, m := range regexp.MustCompile("`(pgward_[a-z_]+)`").FindAllStringSubmatch(doc, -1) {
		if !registered[m[1]] {
			t.Errorf("docs/metrics.md documents %s, which is not registered", m[1])
		}
	}
	if len(registered) < 24 {
		t.Errorf("only %d pgward_ metrics registered", len(registered))
	}
}

func TestMetricsEBPFStats(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := exporter.NewMetrics(reg)
	if got := metricValue(t, reg, "pgward_ebpf_probes_attached"); got != 0 {
		t.Errorf("probes before a tracker = %v", got)
	}
	m.SetEBPFStats(func() exporter.EBPFStats { return exporter.EBPFStats{Events: 10, Lost: 2, Probes: 4} })
	for name, want := range map[string]float64{"pgward_ebpf_events_total": 10, "pgward_ebpf_events_lost_total": 2, "pgward_ebpf_probes_attached": 4} {
		if got := metricValue(t, reg, name); got != want {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
}

func TestMetricsBufferStats(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := exporter.NewMetrics(reg)
	if got := metricValue(t, reg, "pgward_buffer_bytes"); got != 0 {
		t.Errorf("buffer bytes before the broker = %v", got)
	}
	m.SetBufferStats(func() broker.BufferStats {
		return broker.BufferStats{Bytes: 5 << 20, Limit: 256 << 20, Waits: 3, TooLargeFromClient: 7, TooLargeFromServer: 1}
	})
	for name, want := range map[string]float64{"pgward_buffer_bytes": 5 << 20, "pgward_buffer_limit_bytes": 256 << 20, "pgward_buffer_waits_total": 3} {
		if got := metricValue(t, reg, name); got != want {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
	for from, want := range map[string]float64{"client": 7, "server": 1} {
		if got := metricValue(t, reg, "pgward_messages_too_large_total", "from", from); got != want {
			t.Errorf("messages_too_large_total{from=%q} = %v, want %v", from, got, want)
		}
	}
}

func TestHandler(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := exporter.NewMetrics(reg)
	ready, reason := true, ""
	srv := httptest.NewServer(m.Handler(func() (bool, string) { return ready, reason }))
	defer srv.Close()
	get := func(path string) (int, string) {
		t.Helper()
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	tests := []struct {
		path          string
		ready         bool
		reason        string
		code          int
		bodyFragments []string
	}{
		{"/metrics", true, "", 200, []string{"pgward_sessions_active 0", "go_goroutines", "process_open_fds"}},
		{"/v1/metrics/prometheus", true, "", 200, []string{`pgward_auth_failures_total{reason="identity"} 0`}},
		{"/healthz", false, "draining", 200, []string{"ok"}},
		{"/readyz", true, "", 200, []string{"ok\n"}},
		{"/readyz", true, "ebpf: not attached (peer credentials only)", 200, []string{"ok: ebpf: not attached (peer credentials only)"}},
		{"/readyz", false, "draining", 503, []string{"not ready: draining"}},
		{"/nope", true, "", 404, nil},
	}
	for _, tt := range tests {
		ready, reason = tt.ready, tt.reason
		code, body := get(tt.path)
		if code != tt.code {
			t.Errorf("GET %s (ready %v %q) = %d, want %d", tt.path, tt.ready, tt.reason, code, tt.code)
		}
		for _, f := range tt.bodyFragments {
			if !strings.Contains(body, f) {
				t.Errorf("GET %s: body lacks %q", tt.path, f)
			}
		}
	}
}

// promtool returns the path of promtool, or skips (fails under CI=true).
func promtool(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("promtool")
	if err == nil {
		return p
	}
	testenv.SkipUnlessCI(t, "promtool not found; install it with: apt-get update && apt-get install -y prometheus")
	return ""
}

func TestPromtoolCheckMetrics(t *testing.T) {
	pt := promtool(t)
	fx := newFixture(t, exporter.AuditConfig{})
	exerciseObserver(t, fx)
	srv := httptest.NewServer(fx.m.Handler(nil))
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	cmd := exec.Command(pt, "check", "metrics")
	cmd.Stdin = strings.NewReader(string(body))
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("promtool check metrics: %v\n%s", err, out)
	}
}
