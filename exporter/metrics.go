package exporter

import (
	"net/http"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/pgward/pgward/broker"
)

const namespace = "pgward"

var stages = []broker.Stage{broker.StageTotal, broker.StageIdentity, broker.StageCredentials, broker.StageUpstreamAuth}

var failureReasons = []broker.FailureReason{
	broker.ReasonIdentity, broker.ReasonUnauthorized, broker.ReasonThrottled,
	broker.ReasonBackendError, broker.ReasonUpstreamRejected, broker.ReasonProtocol,
}

// reasonOther is the auth_failures_total label for a reason the exporter does
// not know (a newer broker); it keeps the label set bounded.
const reasonOther = "other"

// EBPFStats is what the eBPF tracker reports about itself.
type EBPFStats struct {
	Events uint64 // connect events read from the ring buffer, since start
	Lost   uint64 // events the kernel could not queue (ring buffer full), since start
	Probes int    // programs attached now
}

// Metrics is pgward's Prometheus metric set, registered on a private registry.
// Every label value comes from a fixed set, created up front, so the hot path
// does no label lookups.
type Metrics struct {
	reg  *prometheus.Registry
	ship *shipMetrics // audit shipping (ship_metrics.go), 0 unless on

	requests, responses, errorResponses                prometheus.Counter
	duration                                           map[broker.Stage]prometheus.Observer
	verifyAttempts, verifyFailures                     prometheus.Counter
	matchAttempts, matchFailures                       prometheus.Counter
	retrievalAttempts, retrievalFailures, unauthorized prometheus.Counter
	authFailures                                       map[broker.FailureReason]prometheus.Counter
	authFailuresOther                                  prometheus.Counter
	sessionsActive                                     prometheus.Gauge
	sessionsTotal, queries                             prometheus.Counter
	relayToUpstream, relayToClient                     prometheus.Counter
	cancelForwarded, cancelRejected                    prometheus.Counter
	directBlocked, directAllowed                       prometheus.Counter
	auditEvents                                        [numKinds]prometheus.Counter
	auditWriteFailures, auditDropped                   prometheus.Counter
	switchableRoles                                    *prometheus.GaugeVec
	ebpf                                               atomic.Pointer[func() EBPFStats]
	ebpfEventsDesc, ebpfLostDesc, ebpfProbesDesc       *prometheus.Desc
	buffers                                            atomic.Pointer[func() broker.BufferStats]
	bufBytesDesc, bufLimitDesc, bufWaitsDesc           *prometheus.Desc
	tooLargeDesc                                       *prometheus.Desc
	hostile                                            *hostileMetrics // below
	certs                                              *certMetrics    // certmetrics.go
}

// NewMetrics creates every pgward_ metric on reg, with the Go and process
// collectors. It panics if reg already holds them (a wiring bug).
func NewMetrics(reg *prometheus.Registry) *Metrics {
	m := &Metrics{reg: reg, ship: newShipMetrics(reg), certs: newCertMetrics(reg)}
	counter := func(name, help string) prometheus.Counter {
		c := prometheus.NewCounter(prometheus.CounterOpts{Namespace: namespace, Name: name, Help: help})
		reg.MustRegister(c)
		return c
	}
	m.requests = counter("requests_total", "Authentication requests (connections that sent a startup message or failed identity before it).")
	m.responses = counter("responses_total", "Authentication requests that ended in a session.")
	m.errorResponses = counter("error_responses_total", "Authentication requests that were refused.")
	m.verifyAttempts = counter("identity_verification_attempts_total", "Attempts to prove who the caller is from kernel facts.")
	m.verifyFailures = counter("identity_verification_failures_total", "Identity verifications that failed.")
	m.matchAttempts = counter("identity_matching_attempts_total", "Claimed principals checked against the kernel identity.")
	m.matchFailures = counter("identity_matching_failures_total", "Claimed principals the kernel identity did not match.")
	m.retrievalAttempts = counter("password_retrieval_attempts_total", "Requests for a credential: fetches made, plus requests refused as unauthorized.")
	m.retrievalFailures = counter("password_retrieval_failures_total", "Credential fetches that failed at the secrets backend.")
	m.unauthorized = counter("password_retrieval_unauthorized_total", "Requests for a role on an upstream the caller holds no grant for.")
	m.sessionsTotal = counter("sessions_total", "Sessions started.")
	m.queries = counter("queries_total", "Statements forwarded upstream (simple Query, or Execute).")
	m.auditWriteFailures = counter("audit_write_failures_total", "Audit lines that could not be written (or fsync'ed).")
	m.auditDropped = counter("audit_events_dropped_total", "Audit events lost: in async durability, queue full or write failed; in write/fsync durability, result lines (db.session.query.result) whose write failed.")

	dur := prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: namespace, Name: "request_duration_seconds",
		Help:    "Authentication request latency by stage.",
		Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
	}, []string{"stage"})
	reg.MustRegister(dur)
	m.duration = make(map[broker.Stage]prometheus.Observer, len(stages))
	for _, s := range stages {
		m.duration[s] = dur.WithLabelValues(string(s))
	}

	af := prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Name: "auth_failures_total",
		Help: "Refused authentication requests by reason.",
	}, []string{"reason"})
	reg.MustRegister(af)
	m.authFailures = make(map[broker.FailureReason]prometheus.Counter, len(failureReasons))
	for _, r := range failureReasons {
		m.authFailures[r] = af.WithLabelValues(string(r))
	}
	m.authFailuresOther = af.WithLabelValues(reasonOther)

	m.sessionsActive = prometheus.NewGauge(prometheus.GaugeOpts{Namespace: namespace, Name: "sessions_active", Help: "Sessions open now."})
	reg.MustRegister(m.sessionsActive)

	relay := prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Name: "relay_bytes_total", Help: "Bytes relayed by direction.",
	}, []string{"direction"})
	reg.MustRegister(relay)
	m.relayToUpstream = relay.WithLabelValues("client_to_upstream")
	m.relayToClient = relay.WithLabelValues("upstream_to_client")

	cancel := prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Name: "cancel_requests_total", Help: "CancelRequests by outcome.",
	}, []string{"outcome"})
	reg.MustRegister(cancel)
	m.cancelForwarded = cancel.WithLabelValues("forwarded")
	m.cancelRejected = cancel.WithLabelValues("rejected")

	direct := prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Name: "direct_connects_total",
		Help: "Connects to a guarded Postgres endpoint that went around pgward, seen by eBPF.",
	}, []string{"blocked"})
	reg.MustRegister(direct)
	m.directBlocked = direct.WithLabelValues("true")
	m.directAllowed = direct.WithLabelValues("false")

	events := prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Name: "audit_events_total", Help: "Audit events written (queued, in async durability) by event.",
	}, []string{"event"})
	reg.MustRegister(events)
	for i, name := range eventNames {
		m.auditEvents[i] = events.WithLabelValues(name)
	}

	m.switchableRoles = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: namespace, Name: "credential_switchable_roles",
		Help: "Roles the login role of a credential can become (SET ROLE), learned at the credential's first use; +Inf for a superuser (any role). Labels are the configured upstream and the granted role.",
	}, []string{"upstream", "role"})
	reg.MustRegister(m.switchableRoles)

	m.ebpfEventsDesc = prometheus.NewDesc(namespace+"_ebpf_events_total", "Connect events read from the eBPF ring buffer.", nil, nil)
	m.ebpfLostDesc = prometheus.NewDesc(namespace+"_ebpf_events_lost_total", "Connect events lost because the eBPF ring buffer was full.", nil, nil)
	m.ebpfProbesDesc = prometheus.NewDesc(namespace+"_ebpf_probes_attached", "eBPF programs attached now; 0 means identity from peer credentials only.", nil, nil)
	reg.MustRegister(ebpfCollector{m})
	m.hostile = newHostileMetrics(reg)

	m.bufBytesDesc = prometheus.NewDesc(namespace+"_buffer_bytes", "Bytes held now in relay buffers grown past the standard 32 KiB read buffer, counted against limits.buffer_memory.", nil, nil)
	m.bufLimitDesc = prometheus.NewDesc(namespace+"_buffer_limit_bytes", "limits.buffer_memory: the most pgward_buffer_bytes may reach.", nil, nil)
	m.bufWaitsDesc = prometheus.NewDesc(namespace+"_buffer_waits_total", "Times a session stopped reading because limits.buffer_memory was spent (backpressure).", nil, nil)
	m.tooLargeDesc = prometheus.NewDesc(namespace+"_messages_too_large_total", "Messages refused for announcing more than limits.max_message_bytes, by sender.", []string{"from"}, nil)
	reg.MustRegister(bufferCollector{m})

	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// The audit trail reports through AuditMetrics.
var _ AuditMetrics = (*Metrics)(nil)

// AuditEvents counts n events of kind k in audit_events_total.
func (m *Metrics) AuditEvents(k EventKind, n int) {
	if k < numKinds {
		m.auditEvents[k].Add(float64(n))
	}
}

// AuditWriteFailed counts a failed audit write in audit_write_failures_total.
func (m *Metrics) AuditWriteFailed() { m.auditWriteFailures.Inc() }

// AuditDropped counts n lost events in audit_events_dropped_total.
func (m *Metrics) AuditDropped(n int) { m.auditDropped.Add(float64(n)) }

// AuditStorage installs the function the audit_free_bytes,
// audit_min_free_bytes, audit_seconds_until_full and audit_bytes_total
// metrics read (the file sink's). Until it is called, or when f is nil,
// they read 0.
func (m *Metrics) AuditStorage(f func() AuditStorageStats) {
	if f == nil {
		m.hostile.storage.Store(nil)
		return
	}
	m.hostile.storage.Store(&f)
}

// SetEBPFStats installs the function scraped for the ebpf_* metrics (the
// agent's tracker). Until it is called, or when f is nil, they read 0.
func (m *Metrics) SetEBPFStats(f func() EBPFStats) {
	if f == nil {
		m.ebpf.Store(nil)
		return
	}
	m.ebpf.Store(&f)
}

type ebpfCollector struct{ m *Metrics }

func (c ebpfCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.m.ebpfEventsDesc
	ch <- c.m.ebpfLostDesc
	ch <- c.m.ebpfProbesDesc
}

func (c ebpfCollector) Collect(ch chan<- prometheus.Metric) {
	var s EBPFStats
	if f := c.m.ebpf.Load(); f != nil {
		s = (*f)()
	}
	ch <- prometheus.MustNewConstMetric(c.m.ebpfEventsDesc, prometheus.CounterValue, float64(s.Events))
	ch <- prometheus.MustNewConstMetric(c.m.ebpfLostDesc, prometheus.CounterValue, float64(s.Lost))
	ch <- prometheus.MustNewConstMetric(c.m.ebpfProbesDesc, prometheus.GaugeValue, float64(s.Probes))
}

// SetBufferStats installs the function scraped for the buffer_* and
// messages_too_large_total metrics (the broker's Server.BufferStats). Until
// it is called, or when f is nil, they read 0.
func (m *Metrics) SetBufferStats(f func() broker.BufferStats) {
	if f == nil {
		m.buffers.Store(nil)
		return
	}
	m.buffers.Store(&f)
}

type bufferCollector struct{ m *Metrics }

func (c bufferCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.m.bufBytesDesc
	ch <- c.m.bufLimitDesc
	ch <- c.m.bufWaitsDesc
	ch <- c.m.tooLargeDesc
}

func (c bufferCollector) Collect(ch chan<- prometheus.Metric) {
	var s broker.BufferStats
	if f := c.m.buffers.Load(); f != nil {
		s = (*f)()
	}
	ch <- prometheus.MustNewConstMetric(c.m.bufBytesDesc, prometheus.GaugeValue, float64(s.Bytes))
	ch <- prometheus.MustNewConstMetric(c.m.bufLimitDesc, prometheus.GaugeValue, float64(s.Limit))
	ch <- prometheus.MustNewConstMetric(c.m.bufWaitsDesc, prometheus.CounterValue, float64(s.Waits))
	ch <- prometheus.MustNewConstMetric(c.m.tooLargeDesc, prometheus.CounterValue, float64(s.TooLargeFromClient), "client")
	ch <- prometheus.MustNewConstMetric(c.m.tooLargeDesc, prometheus.CounterValue, float64(s.TooLargeFromServer), "server")
}

// ReadyFunc reports whether the agent should receive traffic, and a reason
// that /readyz prints either way (e.g. "ebpf: not attached (peer credentials
// only)" while ready, "draining" while not).
type ReadyFunc func() (ok bool, reason string)

// Handler serves the operations endpoints:
//
//	/metrics, /v1/metrics/prometheus  the registry, Prometheus text/OpenMetrics
//	/healthz                          200 "ok" while the process serves HTTP
//	/readyz                           200 "ok[: reason]" or 503 "not ready: reason"
//
// ready may be nil (always ready).
func (m *Metrics) Handler(ready ReadyFunc) http.Handler {
	mux := http.NewServeMux()
	prom := promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{EnableOpenMetrics: true})
	mux.Handle("GET /metrics", prom)
	mux.Handle("GET /v1/metrics/prometheus", prom)
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		ok, reason := true, ""
		if ready != nil {
			ok, reason = ready()
		}
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Header().Set("Cache-Control", "no-store")
		switch {
		case ok && reason == "":
			_, _ = w.Write([]byte("ok\n"))
		case ok:
			_, _ = w.Write([]byte("ok: " + reason + "\n"))
		default:
			w.WriteHeader(http.StatusServiceUnavailable)
			_, _ = w.Write([]byte("not ready: " + reason + "\n"))
		}
	})
	return mux
}

// AuditStorageStats is what the audit storage metrics read of the file sink.
type AuditStorageStats struct {
	FreeBytes        uint64  // available on the audit directory's file system (0 if unknown)
	MinFreeBytes     int64   // audit.min_free_bytes
	SecondsUntilFull float64 // at the write rate of the last minute; +Inf when nothing is written
	BytesTotal       int64   // appended since the sink opened
}

// hostileMetrics are the metrics of issue 13: slot refusals, summarised
// refusals, and the audit file system's free space.
type hostileMetrics struct {
	connRefused        map[string]prometheus.Counter
	connRefusedOther   prometheus.Counter
	refusalsSummarized prometheus.Counter
	storage            atomic.Pointer[func() AuditStorageStats] // the file sink's
}

func newHostileMetrics(reg *prometheus.Registry) *hostileMetrics {
	h := &hostileMetrics{}
	refused := prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Name: "connections_refused_total",
		Help: "Connections refused with 53300 before authentication for want of a slot, by reason (max_connections, per_uid, per_cgroup).",
	}, []string{"reason"})
	reg.MustRegister(refused)
	h.connRefused = map[string]prometheus.Counter{}
	for _, r := range []string{broker.SlotMaxConnections, broker.SlotPerUID, broker.SlotPerCgroup} {
		h.connRefused[r] = refused.WithLabelValues(r)
	}
	h.connRefusedOther = refused.WithLabelValues(reasonOther)
	h.refusalsSummarized = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: namespace, Name: "audit_refusals_summarized_total",
		Help: "Refusals beyond the audit allowance, written only as counts in db.refusal.summary events.",
	})
	reg.MustRegister(h.refusalsSummarized)
	stats := func() (AuditStorageStats, bool) {
		if f := h.storage.Load(); f != nil {
			return (*f)(), true
		}
		return AuditStorageStats{}, false
	}
	gauge := func(name, help string, f func(s AuditStorageStats) float64) {
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: namespace, Name: name, Help: help}, func() float64 {
			if s, ok := stats(); ok {
				return f(s)
			}
			return 0
		}))
	}
	gauge("audit_free_bytes", "Bytes available to pgward on the audit directory's file system.", func(s AuditStorageStats) float64 {
		return float64(s.FreeBytes)
	})
	gauge("audit_min_free_bytes", "The configured floor (audit.min_free_bytes); below it pgward warns.", func(s AuditStorageStats) float64 {
		return float64(s.MinFreeBytes)
	})
	gauge("audit_seconds_until_full", "Estimate of the seconds until the audit file system is full (and new sessions are refused, 58030) at the audit write rate of the last minute; +Inf when nothing is written.", func(s AuditStorageStats) float64 {
		return s.SecondsUntilFull
	})
	reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{
		Namespace: namespace, Name: "audit_bytes_total", Help: "Bytes appended to the audit trail.",
	}, func() float64 {
		s, _ := stats()
		return float64(s.BytesTotal)
	}))
	return h
}

func (h *hostileMetrics) slotRefused(reason string) {
	if c, ok := h.connRefused[reason]; ok {
		c.Inc()
		return
	}
	h.connRefusedOther.Inc()
}
