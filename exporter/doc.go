// Package exporter turns what the broker does into the signals an operator
// reads: the audit trail (JSON lines, hash-chained), Prometheus metrics
// (served with health endpoints), OpenTelemetry traces and structured logs.
//
// Observer implements broker.Observer and is the only type the broker sees;
// it is the only place that logs a session's lifecycle events (started,
// refused, ended, cancel request: one line each), counts them, makes their
// spans and audits them. Begin returns a request object (the request's
// spans; Refused or Started), Started a session object (event numbering,
// statements in flight, their spans; End). It writes through an Audit sink,
// a Metrics set, a trace.TracerProvider and a *slog.Logger, all handed to
// NewObserver; nothing here registers globally.
//
// It also reads the trail back (auditread.go, for `pgward audit show`):
// rotated and compressed files in order, filtered, with the chain checked,
// and followed as it grows.
//
// Lifecycle: NewMetrics registers on the registry it is given; OpenAudit
// opens (or continues) the audit file and Close flushes and closes it;
// NewTracerProvider returns a shutdown func that flushes spans. The Observer
// holds no resources beyond its sessions' objects between Started and End.
//
// # Layout
//
//	observer.go     Observer: requests, sessions, cancels, direct connects → metrics, audit, logs
//	tracing.go      the tracer provider from OTEL_* and the session's spans (DESIGN.md §5)
//	log.go          the logger from PGWARD_LOG_FORMAT and PGWARD_LOG_LEVEL
//	redact.go       the one redaction rule for statement text (audit and spans)
//	aggregate.go    refusal pacing: db.refusal.summary for floods of refusals
//	metrics.go      the Prometheus metrics and the audit event names
//	sink.go         Audit (the encoder's front) and the Sink interface
//	schema.go       the audit events' encoding
//	json.go         the append-style JSON encoder of the audit trail
//	params.go       bound parameters in the audit trail (audit.parameters)
//	audit.go        FileSink: the audit file, durability, group commit, rotation, fail-closed
//	chain.go        the hash chain's sealing (seq, prev_hash)
//	checkpoint.go   signed checkpoints of the chain head
//	diskfree.go     the free-space floor (audit.min_free_bytes)
//	auditcheck.go   what check-config checks of the audit path
//	verify.go       audit verify: the chain
//	verify_keyed.go audit verify --key: checkpoints
//
// It deliberately does not parse SQL beyond what redaction needs (lexing as
// PostgreSQL does to find the literal after a PASSWORD keyword), does not ship audit events anywhere
// (a collector tails the file), and does not decide policy: a failing audit
// write is reported to the broker, which refuses the session.
//
// # The audit trail: encoder → Sink
//
// Audit (sink.go) has the encoder (schema.go: event names and codes, the
// fields of each event in their order, the JSON of sessions, statements,
// parameters and processes) make each event's body, an Event, and hands it
// to a Sink: Append, AppendBatch (the statements of one client read, all or
// none), Flush, Close. A Sink is the one interface a new destination
// implements; FileSink (audit.go) is the first and the durable one: group
// commit, the durability levels, rotation, keyed checkpoints
// (checkpoint.go), the free-space floor (diskfree.go). NewAudit takes the
// durable sink and any number of others; OpenAudit opens the FileSink of
// the `audit:` configuration, with the others of WithSink after it.
//
// Fail-closed rests on the durable sink: its error (ErrAuditUnavailable)
// goes back to the broker, which refuses the session or stops forwarding,
// and the event then goes to no other sink. The other sinks get each event
// after the durable one stored it; their failures are logged, once per
// outage, and refuse nothing.
//
// The hash chain (seq, prev_hash) and the checkpoints live in the file
// sink, not in the encoder or in Audit: the chain proves the integrity of
// the file, so it must be kept by what knows what the file holds. A line is
// chained when it is staged and un-chained again when its write fails (the
// chain is always left as the file has it), seq restarts in each rotated
// file while prev_hash runs on across them, an opened file continues the
// chain of its last line, and a checkpoint signs the head of the file it
// ends. A chain kept in front of the sinks could not follow any of that.
// So the Event a sink gets is the body without its closing brace; the file
// sink closes it with its chain fields, which keeps the line on disk, and
// what `pgward audit verify` checks and the OTLP shipper sends, exactly
// what it was (testdata/audit-golden.jsonl pins the bytes). A sink that
// wants its own verifiable record seals with a Chain (chain.go), the file
// sink's sealing: from the same start it writes the same lines. Checkpoint
// events are the file sink's own and go to no other sink.
//
// Audit and FileSink report to Prometheus through AuditMetrics, which
// *Metrics implements; they do not reach into Metrics.
package exporter
