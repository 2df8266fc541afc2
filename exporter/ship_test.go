package exporter_test

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/pgward/pgward/broker"
	"github.com/pgward/pgward/exporter"
	"github.com/pgward/pgward/testenv"
)

// shipFixture is an audit sink whose trail is shipped to a real collector.
type shipFixture struct {
	cfg   exporter.AuditConfig
	col   *testenv.Collector
	reg   *prometheus.Registry
	audit *exporter.Audit
	ship  *exporter.Shipper
	obs   *exporter.Observer
	log   *slog.Logger
	n     atomic.Int64 // events written
}

func newShipFixture(t *testing.T, col *testenv.Collector, cfg exporter.AuditConfig, protocol string) *shipFixture {
	t.Helper()
	if cfg.Path == "" {
		cfg.Path = filepath.Join(t.TempDir(), "audit.jsonl")
	}
	ins := true
	endpoint := col.GRPCAddr
	if protocol == exporter.ShipHTTP {
		endpoint = col.HTTPAddr
	}
	sc := exporter.ShipConfig{Endpoint: endpoint, Protocol: protocol, Insecure: &ins, Timeout: time.Second}
	if cfg.OTLP != nil {
		sc.MaxUndeliveredBytes = cfg.OTLP.MaxUndeliveredBytes
	}
	cfg.OTLP = &sc
	fx := &shipFixture{cfg: cfg, col: col, log: slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))}
	fx.open(t)
	t.Cleanup(func() { fx.close() })
	return fx
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) { w.t.Log(string(b)); return len(b), nil }

// open starts the audit and its shipper (again, after close: a restart).
func (fx *shipFixture) open(t *testing.T) {
	t.Helper()
	fx.reg = prometheus.NewRegistry()
	m := exporter.NewMetrics(fx.reg)
	s, err := exporter.NewShipper(fx.cfg, m, fx.log)
	if err != nil {
		t.Fatal(err)
	}
	a, err := exporter.OpenAudit(fx.cfg, m, fx.log, exporter.WithShipper(s))
	if err != nil {
		t.Fatal(err)
	}
	s.Start()
	fx.audit, fx.ship, fx.obs = a, s, exporter.NewObserver(fx.log, m, a)
}

func (fx *shipFixture) close() {
	if fx.audit != nil {
		fx.obs.Close()
		fx.audit.Close()
		fx.ship.Close()
		fx.audit = nil
	}
}

// write audits n statements (one line each) of one session.
func (fx *shipFixture) write(t *testing.T, n int) {
	t.Helper()
	s := testSession()
	s.SessionID = fmt.Sprintf("s-%d", fx.n.Load())
	qs := make([]*broker.QueryEvent, n)
	for i := range qs {
		qs[i] = &broker.QueryEvent{Index: int64(i + 1), Text: "select " + strconv.Itoa(i) + " from orders where note = 'padding padding padding'"}
	}
	if err := fx.obs.QueryBatch(context.Background(), s, qs); err != nil {
		t.Fatal(err)
	}
	fx.n.Add(int64(n))
}

// spoolLines returns every line of every audit file kept, oldest first.
func spoolLines(t *testing.T, path string) []string {
	t.Helper()
	return testenv.FileLines(t, auditFilesOf(t, path)...)
}

// waitDelivered waits until every line in want has arrived at the collector
// and returns the records by body.
func waitDelivered(t *testing.T, col *testenv.Collector, want []string, limit time.Duration) map[string]testenv.LogRecord {
	t.Helper()
	deadline := time.Now().Add(limit)
	for {
		recs, err := col.Logs()
		if err != nil {
			t.Fatal(err)
		}
		got := make(map[string]testenv.LogRecord, len(recs))
		for _, r := range recs {
			got[r.Body] = r
		}
		missing := 0
		for _, l := range want {
			if _, ok := got[l]; !ok {
				missing++
			}
		}
		if missing == 0 {
			return got
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d audit lines did not arrive at the collector within %v (%d records arrived)", missing, len(want), limit, len(recs))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Every audit line arrives, byte for byte, as the body of one log record,
// over gRPC and over HTTP/protobuf, across rotations; the records carry the
// semantic-convention attributes and the statement's trace id.
func TestShipDeliversEveryLine(t *testing.T) {
	col := testenv.RequireCollector(t)
	for _, proto := range []string{exporter.ShipGRPC, exporter.ShipHTTP} {
		t.Run(proto, func(t *testing.T) {
			fx := newShipFixture(t, col, exporter.AuditConfig{MaxSize: 128 << 10, MaxFiles: 40}, proto)
			for range 20 {
				fx.write(t, 100)
			}
			want := spoolLines(t, fx.cfg.Path)
			if len(want) != 2000 {
				t.Fatalf("%d lines in the audit files, want 2000", len(want))
			}
			if _, err := os.Stat(fx.cfg.Path + ".3"); err != nil {
				t.Fatalf("the test wants several rotations: %v", err)
			}
			got := waitDelivered(t, col, want, 30*time.Second)
			if _, err := exporter.VerifyFiles(auditFilesOf(t, fx.cfg.Path)...); err != nil {
				t.Fatalf("the audit files do not verify: %v", err)
			}
			r := got[want[len(want)-1]]
			s := testSession()
			for k, v := range map[string]any{
				"db.system.name": "postgresql", "db.namespace": s.Database, "process.pid": int64(s.Identity.PID),
				"process.executable.path": s.Identity.Exe, "event.name": nil, "pgward.principal": s.Principal,
				"db.query.text": "select 99 from orders where note = 'padding padding padding'",
			} {
				if v == nil {
					continue
				}
				if r.Attrs[k] != v {
					t.Errorf("attribute %s = %v, want %v (record %+v)", k, r.Attrs[k], v, r)
				}
			}
			host, _ := os.Hostname()
			if r.TraceID != s.RequestID || r.Resource["host.name"] != host || r.Resource["service.name"] != "pgward" {
				t.Errorf("trace id %s, resource %v", r.TraceID, r.Resource)
			}
			waitMetric(t, fx.reg, "pgward_audit_ship_lag_events", 0)
			if v := metricValue(t, fx.reg, "pgward_audit_ship_events_total"); v < 2000 {
				t.Errorf("pgward_audit_ship_events_total = %v, want ≥ 2000", v)
			}
		})
	}
}

// countArrived returns how many of lines the collector has received.
func countArrived(t *testing.T, col *testenv.Collector, lines []string) int64 {
	t.Helper()
	recs, err := col.Logs()
	if err != nil {
		t.Fatal(err)
	}
	got := make(map[string]bool, len(recs))
	for _, r := range recs {
		got[r.Body] = true
	}
	var n int64
	for _, l := range lines {
		if got[l] {
			n++
		}
	}
	return n
}

// verifyArrived checks what the collector wrote with `audit verify --otlp`'s
// code: one node, the chain intact across every file, n lines at least.
func verifyArrived(t *testing.T, col *testenv.Collector, n int) {
	t.Helper()
	data, err := os.ReadFile(col.OutputPath)
	if err != nil {
		t.Fatal(err)
	}
	nodes, _, err := exporter.ReadShipped(bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	reps, err := exporter.VerifyShipped(nodes, exporter.VerifyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(reps) != 1 || len(reps[0].Audit.Problems) > 0 || reps[0].Audit.Lines < n {
		var b bytes.Buffer
		for _, r := range reps {
			r.WriteText(&b)
		}
		t.Fatalf("what arrived does not verify (want one node, %d lines, no problem):\n%s", n, b.String())
	}
}

func waitMetric(t *testing.T, g prometheus.Gatherer, name string, want float64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		v := metricValue(t, g, name)
		if v == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s = %v, want %v", name, v, want)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// The collector is killed mid-stream and restarted: the shipper retries and
// every line arrives.
func TestShipCollectorKilledMidStream(t *testing.T) {
	col := testenv.RequireCollector(t)
	fx := newShipFixture(t, col, exporter.AuditConfig{MaxSize: 256 << 10, MaxFiles: 50}, exporter.ShipGRPC)
	for i := range 30 {
		fx.write(t, 50)
		if i == 10 {
			col.Kill()
		}
		if i == 20 {
			// Let an export fail against the dead collector: waited for,
			// not a fixed 1.5 s a loaded machine can outrun.
			for deadline := time.Now().Add(10 * time.Second); metricValue(t, fx.reg, "pgward_audit_ship_failures_total") == 0; time.Sleep(50 * time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatal("no export failed in 10 s against the dead collector")
				}
			}
			if err := col.Start(context.Background()); err != nil {
				t.Fatal(err)
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	want := spoolLines(t, fx.cfg.Path)
	waitDelivered(t, col, want, 30*time.Second)
	verifyArrived(t, col, len(want))
	if v := metricValue(t, fx.reg, "pgward_audit_ship_failures_total"); v == 0 {
		t.Error("no export failed while the collector was dead")
	}
	if fx.ship.Lost() != 0 {
		t.Errorf("%d events counted lost", fx.ship.Lost())
	}
}

// A stalled collector (SIGSTOP) does not slow statements: audit writes go
// on at full speed, and once it thaws everything arrives.
func TestShipCollectorStalls(t *testing.T) {
	col := testenv.RequireCollector(t)
	fx := newShipFixture(t, col, exporter.AuditConfig{}, exporter.ShipGRPC)
	fx.write(t, 100)
	waitDelivered(t, col, spoolLines(t, fx.cfg.Path), 15*time.Second)
	if err := col.Stall(); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	for range 50 {
		fx.write(t, 100)
	}
	if d := time.Since(t0); d > 5*time.Second {
		t.Errorf("5000 audit events took %v while the collector stalled", d)
	}
	// The lag is reported once an export has failed (the shipper's 1 s
	// timeout): waited for, not read once after a fixed sleep, which a
	// loaded machine can outrun.
	for deadline := time.Now().Add(10 * time.Second); metricValue(t, fx.reg, "pgward_audit_ship_lag_events") == 0; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("pgward_audit_ship_lag_events is still 0 10 s into the collector's stall")
		}
	}
	if err := col.Resume(); err != nil {
		t.Fatal(err)
	}
	want := spoolLines(t, fx.cfg.Path)
	waitDelivered(t, col, want, 30*time.Second)
	waitMetric(t, fx.reg, "pgward_audit_ship_lag_events", 0)
	verifyArrived(t, col, len(want))
}

// A restart of the shipper resumes from the saved cursor: lines written
// while it was down arrive, and what was delivered before is not sent again
// (beyond a batch in flight).
func TestShipResumesAfterRestart(t *testing.T) {
	col := testenv.RequireCollector(t)
	fx := newShipFixture(t, col, exporter.AuditConfig{MaxSize: 64 << 10, MaxFiles: 20}, exporter.ShipGRPC)
	fx.write(t, 500)
	waitDelivered(t, col, spoolLines(t, fx.cfg.Path), 15*time.Second)
	fx.close()
	// Written while nothing ships: a rotation or more.
	a, err := exporter.OpenAudit(fx.cfg, nil, fx.log)
	if err != nil {
		t.Fatal(err)
	}
	obs := exporter.NewObserver(fx.log, exporter.NewMetrics(prometheus.NewRegistry()), a)
	s := testSession()
	for i := range 300 {
		if err := obs.Query(context.Background(), s, &broker.QueryEvent{Index: int64(i), Text: "select 'while down'"}); err != nil {
			t.Fatal(err)
		}
	}
	obs.Close()
	a.Close()
	fx.open(t)
	fx.write(t, 200)
	want := spoolLines(t, fx.cfg.Path)
	waitDelivered(t, col, want, 30*time.Second)
	recs, err := col.Logs()
	if err != nil {
		t.Fatal(err)
	}
	if len(recs) > len(want)+512 {
		t.Errorf("%d records arrived for %d lines: the restart re-sent more than a batch", len(recs), len(want))
	}
	verifyArrived(t, col, len(want))
}

// With the collector down, rotation keeps undelivered files up to
// audit.otlp.max_undelivered_bytes and then deletes the oldest, counting
// its events as lost. When the collector is back, every event written is
// either delivered or counted lost.
func TestShipDiskCap(t *testing.T) {
	col := testenv.RequireCollector(t)
	fx := newShipFixture(t, col, exporter.AuditConfig{MaxSize: 32 << 10, MaxFiles: 2,
		OTLP: &exporter.ShipConfig{MaxUndeliveredBytes: 128 << 10}}, exporter.ShipGRPC)
	fx.write(t, 50)
	waitDelivered(t, col, spoolLines(t, fx.cfg.Path), 15*time.Second)
	col.Kill()
	var all []string
	seen := map[string]bool{}
	for range 40 {
		fx.write(t, 50)
		for _, l := range spoolLines(t, fx.cfg.Path) {
			if !seen[l] {
				seen[l] = true
				all = append(all, l)
			}
		}
	}
	if len(all) != int(fx.n.Load()) {
		t.Fatalf("saw %d lines, wrote %d", len(all), fx.n.Load())
	}
	lost := fx.ship.Lost()
	if lost == 0 {
		t.Fatal("no event counted lost although far more than the cap was written undelivered")
	}
	var kept int64
	for _, n := range auditFilesOf(t, fx.cfg.Path)[:len(auditFilesOf(t, fx.cfg.Path))-1] {
		fi, _ := os.Stat(n)
		kept += fi.Size()
	}
	if kept > 2*(32<<10)+(128<<10)+(32<<10) {
		t.Errorf("%d bytes of rotated files kept; the cap allows about %d", kept, 2*(32<<10)+(128<<10))
	}
	if v := metricValue(t, fx.reg, "pgward_audit_ship_lost_events_total"); v != float64(lost) {
		t.Errorf("pgward_audit_ship_lost_events_total = %v, Lost() = %d", v, lost)
	}
	if err := col.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	waitDelivered(t, col, spoolLines(t, fx.cfg.Path), 30*time.Second)
	delivered := countArrived(t, col, all)
	if delivered+lost < int64(len(all)) {
		t.Errorf("%d events written, %d delivered, %d counted lost: %d unaccounted for", len(all), delivered, lost, int64(len(all))-delivered-lost)
	}
	if delivered+lost > int64(len(all))+2048 { // a batch (shipBatchLines) in flight
		t.Errorf("%d delivered + %d lost for %d written: lost overcounts by more than a batch", delivered, lost, len(all))
	}
}

// What the collector wrote verifies per node and per file with the signed
// checkpoints that arrived with it, in any order and with duplicates; a
// lost batch is a gap that leaves lines unproven.
func TestShipVerifyWhatArrived(t *testing.T) {
	col := testenv.RequireCollector(t)
	priv, pubPEM, err := exporter.GenerateCheckpointKey()
	if err != nil {
		t.Fatal(err)
	}
	key, err := exporter.ParseCheckpointKey(string(priv))
	if err != nil {
		t.Fatal(err)
	}
	pub, err := exporter.ParseCheckpointPublicKey(pubPEM)
	if err != nil {
		t.Fatal(err)
	}
	ins := true
	cfg := exporter.AuditConfig{Path: filepath.Join(t.TempDir(), "audit.jsonl"), MaxSize: 64 << 10, MaxFiles: 40,
		Checkpoint: exporter.CheckpointConfig{EveryLines: 50},
		OTLP:       &exporter.ShipConfig{Endpoint: col.GRPCAddr, Insecure: &ins, Timeout: time.Second}}
	s, err := exporter.NewShipper(cfg, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	a, err := exporter.OpenAudit(cfg, nil, nil, exporter.WithCheckpointKey(key), exporter.WithShipper(s))
	if err != nil {
		t.Fatal(err)
	}
	s.Start()
	obs := exporter.NewObserver(nil, exporter.NewMetrics(prometheus.NewRegistry()), a)
	sess := testSession()
	for i := range 600 {
		if err := obs.Query(context.Background(), sess, &broker.QueryEvent{Index: int64(i), Text: "select 'a fairly long statement text to make files rotate' || " + strconv.Itoa(i)}); err != nil {
			t.Fatal(err)
		}
	}
	obs.Close()
	a.Close() // a last checkpoint over everything
	waitDelivered(t, col, spoolLines(t, cfg.Path), 30*time.Second)
	s.Close()

	out, err := os.ReadFile(col.OutputPath)
	if err != nil {
		t.Fatal(err)
	}
	verify := func(data []byte) *exporter.ShippedReport {
		t.Helper()
		nodes, _, err := exporter.ReadShipped(bytes.NewReader(data))
		if err != nil {
			t.Fatal(err)
		}
		if len(nodes) != 1 {
			t.Fatalf("%d nodes, want 1", len(nodes))
		}
		reps, err := exporter.VerifyShipped(nodes, exporter.VerifyOptions{Key: pub})
		if err != nil {
			t.Fatal(err)
		}
		return reps[0]
	}
	rep := verify(out)
	var text bytes.Buffer
	rep.WriteText(&text)
	if !rep.Audit.OK() || rep.Audit.Lines != len(spoolLines(t, cfg.Path)) || len(rep.Node.Files) < 3 {
		t.Fatalf("what arrived does not verify:\n%s", text.String())
	}
	// Reversed, with every request twice: the same answer.
	lines := bytes.Split(bytes.TrimSpace(out), []byte("\n"))
	var mixed [][]byte
	for i := len(lines) - 1; i >= 0; i-- {
		mixed = append(mixed, lines[i], lines[i])
	}
	rep2 := verify(bytes.Join(mixed, []byte("\n")))
	if !rep2.Audit.OK() || rep2.Audit.Lines != rep.Audit.Lines || rep2.Node.Duplicates < rep.Node.Records {
		var b bytes.Buffer
		rep2.WriteText(&b)
		t.Fatalf("reordered and duplicated:\n%s", b.String())
	}
	// A batch that never arrived: a gap, reported, and lines unproven.
	var cut [][]byte
	for i, l := range lines {
		if i != len(lines)/2 {
			cut = append(cut, l)
		}
	}
	rep3 := verify(bytes.Join(cut, []byte("\n")))
	if rep3.Audit.OK() || len(rep3.Audit.Problems) == 0 || rep3.Audit.Unproven == 0 {
		var b bytes.Buffer
		rep3.WriteText(&b)
		t.Fatalf("a missing batch went unnoticed:\n%s", b.String())
	}
}

// auditFilesOf is exporter.AuditFiles, failing the test on an error.
func auditFilesOf(t testing.TB, path string) []string {
	t.Helper()
	files, err := exporter.AuditFiles(path)
	if err != nil {
		t.Fatal(err)
	}
	return files
}
