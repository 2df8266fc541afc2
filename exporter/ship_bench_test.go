package exporter_test

import (
	"context"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/pgward/pgward/broker"
	"github.com/pgward/pgward/exporter"
	"github.com/pgward/pgward/testenv"
)

func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkShip measures the shipper against the real collector (gRPC):
// "backlog" ships b.N audit lines written beforehand (events/s shipped, and
// this process's CPU per event, which is the shipper's alone: nothing else
// runs); "live" writes b.N statements while the shipper runs and reports
// the write rate, the ship rate and the lag when the writing ends. The
// collector runs in a process of its own: its CPU is not counted.
func BenchmarkShip(b *testing.B) {
	col := testenv.RequireCollector(b)
	for _, mode := range []string{"backlog", "live"} {
		b.Run(mode, func(b *testing.B) {
			ins := true
			cfg := exporter.AuditConfig{Path: filepath.Join(b.TempDir(), "audit.jsonl"), MaxFiles: 1000,
				OTLP: &exporter.ShipConfig{Endpoint: col.GRPCAddr, Insecure: &ins}}
			reg := prometheus.NewRegistry()
			m := exporter.NewMetrics(reg)
			s, err := exporter.NewShipper(cfg, m, nil)
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			a, err := exporter.OpenAudit(cfg, m, nil, exporter.WithShipper(s))
			if err != nil {
				b.Fatal(err)
			}
			defer a.Close()
			obs := exporter.NewObserver(nil, m, a)
			defer obs.Close()
			sess := testSession()
			write := func(n int) {
				qs := make([]*broker.QueryEvent, 0, 100)
				for i := 0; i < n; i += len(qs) {
					qs = qs[:0]
					for j := 0; j < 100 && i+j < n; j++ {
						qs = append(qs, &broker.QueryEvent{Index: int64(i + j), Text: "select * from orders where id = " + strconv.Itoa(i+j)})
					}
					if err := obs.QueryBatch(context.Background(), sess, qs); err != nil {
						b.Fatal(err)
					}
				}
			}
			shipped := func() float64 { return metricValue(b, reg, "pgward_audit_ship_events_total") }
			if mode == "backlog" {
				write(b.N)
			}
			b.ResetTimer()
			t0, c0 := time.Now(), cpuTime()
			s.Start()
			var wrote time.Duration
			var lagAtEnd float64
			if mode == "live" {
				write(b.N)
				wrote = time.Since(t0)
				lagAtEnd = float64(b.N) - shipped()
			}
			// Polled seldom: each look gathers the whole registry (process
			// and Go collectors too), CPU the shipper is charged with.
			for shipped() < float64(b.N) {
				time.Sleep(100 * time.Millisecond)
			}
			d, cpu := time.Since(t0), cpuTime()-c0
			b.StopTimer()
			b.ReportMetric(float64(b.N)/d.Seconds(), "shipped/s")
			if mode == "backlog" {
				b.ReportMetric(float64(cpu.Microseconds())/float64(b.N), "cpu-µs/event")
			} else {
				b.ReportMetric(float64(b.N)/wrote.Seconds(), "written/s")
				b.ReportMetric(lagAtEnd, "lag-events-at-end")
			}
		})
	}
}
