// Package exporter turns what the broker does into the three signals an
// operator reads: the audit trail (JSON lines, hash-chained), Prometheus
// metrics (served with health endpoints) and structured logs; it also builds
// the OpenTelemetry tracer provider the broker creates its spans with.
//
// Observer implements broker.Observer and is the only type the broker sees.
// It writes through an Audit sink, a Metrics set and a *slog.Logger, all
// handed to NewObserver; nothing here registers globally.
//
// Lifecycle: NewMetrics registers on the registry it is given; OpenAudit
// opens (or continues) the audit file and Close flushes and closes it;
// NewTracerProvider returns a shutdown func that flushes spans. The Observer
// itself holds no resources beyond per-session counters between SessionStart
// and SessionEnd.
//
// It deliberately does not parse SQL beyond what redaction needs (lexing as
// PostgreSQL does to find the literal after a PASSWORD keyword), does not ship audit events anywhere
// (a collector tails the file), and does not decide policy: a failing audit
// write is reported to the broker, which refuses the session.
package exporter
