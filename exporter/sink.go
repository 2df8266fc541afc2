package exporter

import (
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/trace"

	"github.com/pgward/pgward/broker"
)

// The audit trail is an encoder and sinks: Audit (this file) takes what
// the Observer reports, has the encoder (schema.go) make each event's JSON
// body and hands it to a Sink, which stores it. FileSink (audit.go) is the
// first sink and the durable one. See the package doc for where the hash
// chain lives and why.

var _ Sink = (*FileSink)(nil)

// Event is one encoded audit event as the encoder hands it to a sink.
type Event struct {
	Kind EventKind
	// Body is the event's JSON object without its closing brace, so that a
	// sink can close it with fields of its own (the file sink adds seq and
	// prev_hash: see Chain). It is valid only during the call that passes
	// it, and the next sink gets the same bytes: a sink copies what it keeps
	// and never writes into it.
	Body []byte
}

// Sink is an audit destination: the one interface a new one implements.
// Audit calls it from many sessions at once, on the sessions' own path
// (a statement waits for it), so it must be safe for concurrent use and
// quick: a sink that sends over a network queues and returns.
//
// Fail-closed: an error from the durable sink (the first given to
// NewAudit) means the event is not stored and the session or statement it
// describes must not go ahead; it should wrap ErrAuditUnavailable.
type Sink interface {
	// Append stores one event as durably as the sink is configured to
	// before it returns; a Deferrable event may wait for the next Flush.
	Append(e Event) error
	// AppendBatch stores the db.session.query events of one client read,
	// in order, and succeeds only if all of them were stored.
	AppendBatch(es []Event) error
	// Flush stores the deferrable events held back.
	Flush() error
	// Close flushes and releases the sink; later calls fail with an error
	// wrapping ErrAuditClosed. It is idempotent.
	Close() error
}

// Stager is a durable Sink that can split AppendBatch in two, for the
// event loop (listen.event_loop: broker.StatementStager): StageBatch takes
// the events and returns without waiting for them to be stored;
// WaitStaged returns when they are, with what AppendBatch would have
// returned. Everything staged before a wait is stored with it, so the
// reads of many sessions staged in one loop round share one write. Every
// stage is waited for, once, before its statements are forwarded.
type Stager interface {
	StageBatch(es []Event, t *StageTicket)
	WaitStaged(t *StageTicket) error
}

var _ Stager = (*FileSink)(nil)

// StageTicket is one staged batch (Stager). The zero value is ready to
// use; WaitStaged resets it for the next stage.
type StageTicket struct {
	w   *waiter
	cp  *Checkpoint // a checkpoint staged with the batch
	err error       // stored (or failed) while staging: async mode, the rare paths
}

// AuditMetrics is what the audit trail reports to Prometheus; *Metrics
// implements it. Audit counts the events it hands over; a sink counts its
// failures, its losses and the events it writes of its own (checkpoints).
type AuditMetrics interface {
	AuditEvents(k EventKind, n int) // audit_events_total{event}
	AuditWriteFailed()              // audit_write_failures_total
	AuditDropped(n int)             // audit_events_dropped_total
	// AuditStorage installs the reader of the audit storage gauges
	// (audit_free_bytes, …); the file sink calls it when it opens.
	AuditStorage(f func() AuditStorageStats)
}

// noMetrics is AuditMetrics when none are given.
type noMetrics struct{}

// orNoMetrics is m, or noMetrics when m is nil (or a nil *Metrics).
func orNoMetrics(m AuditMetrics) AuditMetrics {
	if pm, ok := m.(*Metrics); m == nil || ok && pm == nil {
		return noMetrics{}
	}
	return m
}

func (noMetrics) AuditEvents(EventKind, int)            {}
func (noMetrics) AuditWriteFailed()                     {}
func (noMetrics) AuditDropped(int)                      {}
func (noMetrics) AuditStorage(func() AuditStorageStats) {}

// AuditOption adds an optional part to OpenAudit (or OpenFileSink).
type AuditOption func(*auditOptions)

type auditOptions struct {
	cpKey      CheckpointKey
	copies     []Sink
	rotateKeep func(path string, maxFiles int) int // WithShipper
}

// WithCheckpointKey turns keyed checkpoints on (audit.checkpoint): the
// chain head is signed with key every EveryLines lines or Every, before a
// rotation and at Close, as an audit.checkpoint event, and each checkpoint
// is also logged at INFO ("audit checkpoint") for a copy off the node.
func WithCheckpointKey(key CheckpointKey) AuditOption {
	return func(o *auditOptions) { o.cpKey = key }
}

// WithSink adds a sink that receives every event after the audit file (see
// NewAudit for what its failure does). OpenFileSink ignores it.
func WithSink(s Sink) AuditOption {
	return func(o *auditOptions) { o.copies = append(o.copies, s) }
}

// Audit is the audit trail: it encodes what the Observer reports and hands
// each event to its sinks. It is safe for concurrent use.
type Audit struct {
	enc    *encoder
	sink   Sink // the durable one
	copies []*copySink
	m      AuditMetrics
	log    *slog.Logger
	batch  sync.Pool // *[]Event
}

// copySink is a sink after the durable one, with its outage state.
type copySink struct {
	s       Sink
	failing atomic.Bool
}

// NewAudit returns the audit trail that encodes events (with parameters in
// mode params) and appends them to sink, the durable one, then to each of
// copies. m and log may be nil.
//
// Fail-closed rests on sink alone: its error is returned, and the event
// then goes to no copy, so a copy never holds an event the durable record
// lacks. A copy gets each event after sink stored it; a copy's error is
// logged at ERROR (once per outage; it says when it recovers) and is not
// returned: a copy that fails does not stop sessions. A copy that must
// hold everything keeps its own record (as the OTLP shipper does by
// reading the file), or is made the durable sink. A copy sees events in the
// order their durable append returned, which for concurrent sessions may
// differ from the file's; one that chains (Chain) chains its own order.
func NewAudit(params ParamMode, m AuditMetrics, log *slog.Logger, sink Sink, copies ...Sink) *Audit {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	a := &Audit{enc: newEncoder(params), sink: sink, m: orNoMetrics(m), log: log}
	for _, c := range copies {
		a.copies = append(a.copies, &copySink{s: c})
	}
	a.batch.New = func() any { es := make([]Event, 0, 8); return &es }
	return a
}

// OpenAudit opens the audit trail of cfg: a FileSink (OpenFileSink) as the
// durable sink, and the sinks of WithSink after it.
func OpenAudit(cfg AuditConfig, m *Metrics, log *slog.Logger, opts ...AuditOption) (*Audit, error) {
	fs, err := OpenFileSink(cfg, m, log, opts...)
	if err != nil {
		return nil, err
	}
	var o auditOptions
	for _, opt := range opts {
		opt(&o)
	}
	return NewAudit(cfg.WithDefaults().Parameters, m, log, fs, o.copies...), nil
}

// append hands one encoded event to the sinks and recycles its buffer.
func (a *Audit) append(k EventKind, b *[]byte) error {
	e := Event{Kind: k, Body: *b}
	err := a.sink.Append(e)
	if err == nil {
		for _, c := range a.copies {
			c.done(a.log, c.s.Append(e))
		}
		a.m.AuditEvents(k, 1)
	}
	a.enc.putBuf(b)
	return err
}

// done logs a copy's failure once per outage, and its recovery.
func (c *copySink) done(log *slog.Logger, err error) {
	switch {
	case err != nil && !c.failing.Swap(true):
		log.Error("audit: a sink after the audit file failed; sessions go on, that sink misses events until it recovers",
			"sink", fmt.Sprintf("%T", c.s), "error", err)
	case err == nil && c.failing.Load() && c.failing.Swap(false):
		log.Info("audit: the sink after the audit file works again", "sink", fmt.Sprintf("%T", c.s))
	}
}

func (a *Audit) sessionStart(now time.Time, s *broker.SessionInfo, ei int64) error {
	return a.append(kindSessionStart, a.enc.sessionStart(now, s, ei))
}

func (a *Audit) sessionEnd(now time.Time, s *broker.SessionInfo, ei int64) error {
	return a.append(kindSessionEnd, a.enc.sessionEnd(now, s, ei))
}

// stagedQueries is the db.session.query events of one client read, staged
// on the durable sink (Stager) and waited for by waitQueries. A session
// has one, reused for each read.
type stagedQueries struct {
	t    StageTicket
	es   []Event
	bufs []*[]byte // es's bodies, kept for the copies until the durable sink stored them
	n    int       // events staged
}

// stageQueries encodes the statements of one client read and stages them
// on the durable sink; spans[i] (when spans is not nil) is the span id of
// qs[i]. A sink that cannot stage stores them now.
func (a *Audit) stageQueries(sq *stagedQueries, now time.Time, h *sessionHeader, s *broker.SessionInfo, qs []*broker.QueryEvent, ei int64, spans []trace.SpanID) {
	for i, q := range qs {
		var span trace.SpanID
		if i < len(spans) {
			span = spans[i]
		}
		b := a.enc.query(now, h, s, q, ei+int64(i), span)
		sq.bufs = append(sq.bufs, b)
		sq.es = append(sq.es, Event{Kind: kindQuery, Body: *b})
	}
	sq.n = len(qs)
	if st, ok := a.sink.(Stager); ok {
		st.StageBatch(sq.es, &sq.t)
	} else {
		sq.t = StageTicket{err: a.sink.AppendBatch(sq.es)}
	}
	if len(a.copies) == 0 {
		sq.recycle(a.enc)
	}
}

// waitQueries returns once the staged statements are stored (nil: they
// may be forwarded), then hands them to the copies.
func (a *Audit) waitQueries(sq *stagedQueries) error {
	var err error
	if st, ok := a.sink.(Stager); ok {
		err = st.WaitStaged(&sq.t)
	} else {
		err, sq.t = sq.t.err, StageTicket{}
	}
	if err == nil {
		if len(sq.es) > 0 {
			for _, c := range a.copies {
				c.done(a.log, c.s.AppendBatch(sq.es))
			}
		}
		a.m.AuditEvents(kindQuery, sq.n)
	}
	sq.recycle(a.enc)
	return err
}

func (sq *stagedQueries) recycle(enc *encoder) {
	for _, b := range sq.bufs {
		enc.putBuf(b)
	}
	clear(sq.bufs)
	clear(sq.es)
	sq.bufs, sq.es = sq.bufs[:0], sq.es[:0]
}

func (a *Audit) queryResult(now time.Time, h *sessionHeader, s *broker.SessionInfo, q *broker.QueryEvent, ei, queryEI int64, span trace.SpanID, password bool) error {
	return a.append(kindQueryResult, a.enc.queryResult(now, h, s, q, ei, queryEI, span, password))
}

func (a *Audit) cancel(now time.Time, c *broker.CancelEvent, ei int64) error {
	return a.append(kindCancel, a.enc.cancel(now, c, ei))
}

func (a *Audit) directConnect(now time.Time, e *DirectConnectEvent) error {
	return a.append(kindDirect, a.enc.directConnect(now, e))
}

func (a *Audit) refusalSummary(now time.Time, s *refusalSummary) error {
	return a.append(kindRefusalSummary, a.enc.refusalSummary(now, s))
}

// Flush stores the result events the sinks hold back. Tests that read the
// file right after QueryDone call it; the file sink also flushes on its own
// within a few milliseconds.
func (a *Audit) Flush() error {
	err := a.sink.Flush()
	for _, c := range a.copies {
		_ = c.s.Flush()
	}
	return err
}

// Close flushes and closes every sink, the durable one first; it returns
// the durable sink's error. It is idempotent.
func (a *Audit) Close() error {
	err := a.sink.Close()
	for _, c := range a.copies {
		if cerr := c.s.Close(); cerr != nil {
			a.log.Error("audit: close a sink after the audit file", "sink", fmt.Sprintf("%T", c.s), "error", cerr)
		}
	}
	return err
}
