package exporter

import "github.com/prometheus/client_golang/prometheus"

// shipMetrics are the audit shipper's metrics (docs/metrics.md).
type shipMetrics struct {
	shipped, failures, lost prometheus.Counter
	lagEvents, lagSeconds   prometheus.Gauge
}

// newShipMetrics registers them on reg (nil: unregistered, still counted).
func newShipMetrics(reg *prometheus.Registry) *shipMetrics {
	sub := "audit_ship"
	m := &shipMetrics{
		shipped: prometheus.NewCounter(prometheus.CounterOpts{Namespace: namespace, Subsystem: sub, Name: "events_total",
			Help: "Audit events the OpenTelemetry Collector acknowledged (an event resent after a restart counts again)."}),
		failures: prometheus.NewCounter(prometheus.CounterOpts{Namespace: namespace, Subsystem: sub, Name: "failures_total",
			Help: "Export attempts of audit events that failed (each is retried with backoff)."}),
		lost: prometheus.NewCounter(prometheus.CounterOpts{Namespace: namespace, Subsystem: sub, Name: "lost_events_total",
			Help: "Audit events given up on: deleted undelivered past audit.otlp.max_undelivered_bytes or by someone else, or refused by the collector for good."}),
		lagEvents: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: namespace, Subsystem: sub, Name: "lag_events",
			Help: "Audit events written to the file and not yet acknowledged by the collector."}),
		lagSeconds: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: namespace, Subsystem: sub, Name: "lag_seconds",
			Help: "Age of the oldest audit event not yet acknowledged by the collector; 0 when caught up."}),
	}
	if reg != nil {
		reg.MustRegister(m.shipped, m.failures, m.lost, m.lagEvents, m.lagSeconds)
	}
	return m
}
