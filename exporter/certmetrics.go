package exporter

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// certMetrics are about the client certificates pgward gets from Vault's
// PKI secrets engine for upstreams with auth [cert] (docs/metrics.md).
type certMetrics struct {
	renewals *prometheus.CounterVec
	notAfter *prometheus.GaugeVec
}

// Values of the result label of pgward_client_cert_renewals_total.
const (
	certRenewed      = "success"
	certRenewFailure = "failure"
)

func newCertMetrics(reg *prometheus.Registry) *certMetrics {
	c := &certMetrics{
		renewals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "client_cert_renewals_total",
			Help: "Renewals of the client certificate pgward presents to an upstream (Vault PKI), before it expires, by result (success, failure; each retry counts).",
		}, []string{"upstream", "result"}),
		notAfter: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: namespace, Name: "client_cert_expiry_timestamp_seconds",
			Help: "When the client certificate pgward holds for an upstream and role (Vault PKI) expires, in Unix seconds.",
		}, []string{"upstream", "role"}),
	}
	reg.MustRegister(c.renewals, c.notAfter)
	return c
}

// ClientCertUpstreams creates the renewal series (at 0) of the upstreams
// whose client certificates come from Vault's PKI engine.
func (m *Metrics) ClientCertUpstreams(upstreams ...string) {
	for _, u := range upstreams {
		m.certs.renewals.WithLabelValues(u, certRenewed)
		m.certs.renewals.WithLabelValues(u, certRenewFailure)
	}
}

// ClientCert records a client certificate issued for (upstream, role), or
// a renewal of it (renewal), failed or not; notAfter is when the
// certificate current afterwards expires.
func (m *Metrics) ClientCert(upstream, role string, renewal, failed bool, notAfter time.Time) {
	if renewal {
		result := certRenewed
		if failed {
			result = certRenewFailure
		}
		m.certs.renewals.WithLabelValues(upstream, result).Inc()
	}
	if !notAfter.IsZero() {
		m.certs.notAfter.WithLabelValues(upstream, role).Set(float64(notAfter.UnixMilli()) / 1000)
	}
}
