package exporter

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"
)

// Durability says when an audit write counts as done (config key audit.durability).
type Durability string

// The durability modes.
const (
	// DurabilityFsync: the line is written and fsync'ed before the statement
	// (or session) goes ahead.
	DurabilityFsync Durability = "fsync"
	// DurabilityWrite: the line is handed to the kernel with write(2) before
	// the statement goes ahead; it survives a crash of pgward, not of the host.
	// The default.
	DurabilityWrite Durability = "write"
	// DurabilityAsync: the line is queued for a writer goroutine; the caller
	// never waits and never fails. A full queue or a failed write loses the
	// event, counted in pgward_audit_events_dropped_total.
	DurabilityAsync Durability = "async"
)

// Defaults of AuditConfig.
const (
	DefaultAuditMaxSize  = 100 << 20 // bytes
	DefaultAuditMaxFiles = 10
	asyncQueueLen        = 4096
	// resultFlushDelay bounds how long a result line waits for a durable
	// write to ride along with.
	resultFlushDelay = 5 * time.Millisecond
	maxPendingBytes  = 256 << 10
)

// AuditConfig is the `audit:` section of the agent's configuration.
type AuditConfig struct {
	// Path of the active audit file. Rotated files are Path.1 (newest) … Path.N.
	Path string `yaml:"path"`
	// Durability is fsync, write (default) or async.
	Durability Durability `yaml:"durability"`
	// Parameters is redacted (default), full or none.
	Parameters ParamMode `yaml:"parameters"`
	// MaxSize is the size in bytes at which the active file is rotated;
	// 0 means DefaultAuditMaxSize. A single line larger than MaxSize is still
	// written whole, into a file of its own.
	MaxSize int64 `yaml:"max_size"`
	// MaxFiles is how many rotated files are kept besides the active one;
	// 0 means DefaultAuditMaxFiles.
	MaxFiles int `yaml:"max_files"`
	// Checkpoint configures keyed checkpoints (off without a key).
	Checkpoint CheckpointConfig `yaml:"checkpoint"`
	// MinFreeBytes is the free-space floor of the audit directory's file
	// system: below it pgward warns and the audit_seconds_until_full gauge
	// says how long until fail-closed; 0 means DefaultAuditMinFree. See
	// diskfree.go.
	MinFreeBytes int64 `yaml:"min_free_bytes"`
	// OTLP ships the trail to an OpenTelemetry Collector (ship.go); nil
	// means off unless OTEL_EXPORTER_OTLP_LOGS_ENDPOINT is set.
	OTLP *ShipConfig `yaml:"otlp"`
}

// WithDefaults returns c with every zero field set to its default.
func (c AuditConfig) WithDefaults() AuditConfig {
	if c.Durability == "" {
		c.Durability = DurabilityWrite
	}
	if c.Parameters == "" {
		c.Parameters = ParamsRedacted
	}
	if c.MaxSize == 0 {
		c.MaxSize = DefaultAuditMaxSize
	}
	if c.MaxFiles == 0 {
		c.MaxFiles = DefaultAuditMaxFiles
	}
	c.Checkpoint = c.Checkpoint.withDefaults()
	if c.MinFreeBytes == 0 {
		c.MinFreeBytes = DefaultAuditMinFree
	}
	return c
}

// Validate reports every problem of c (after defaults), naming the key.
func (c AuditConfig) Validate() error {
	c = c.WithDefaults()
	var errs []error
	if c.Path == "" {
		errs = append(errs, fieldError("audit.path", "required"))
	}
	switch c.Durability {
	case DurabilityFsync, DurabilityWrite, DurabilityAsync:
	default:
		errs = append(errs, fieldError("audit.durability", "%q is not one of fsync, write, async", c.Durability))
	}
	switch c.Parameters {
	case ParamsRedacted, ParamsFull, ParamsNone:
	default:
		errs = append(errs, fieldError("audit.parameters", "%q is not one of redacted, full, none", c.Parameters))
	}
	if c.MaxSize < 0 {
		errs = append(errs, fieldError("audit.max_size", "%d must not be negative", c.MaxSize))
	}
	if c.MaxFiles < 0 {
		errs = append(errs, fieldError("audit.max_files", "%d must not be negative", c.MaxFiles))
	}
	errs = append(errs, c.Checkpoint.validate()...)
	if c.MinFreeBytes < 0 {
		errs = append(errs, fieldError("audit.min_free_bytes", "%d must not be negative", c.MinFreeBytes))
	}
	if ShipEnabled(c.OTLP, nil) {
		var sc ShipConfig
		if c.OTLP != nil {
			sc = *c.OTLP
		}
		if _, err := sc.resolve(nil); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// ErrAuditUnavailable is returned (wrapped) when an event could not be made
// durable; the broker refuses the session or stops forwarding.
var ErrAuditUnavailable = errors.New("audit trail unavailable")

// ErrAuditClosed is returned (wrapped in ErrAuditUnavailable) after Close.
var ErrAuditClosed = errors.New("audit sink closed")

// auditFile is what the sink needs of an *os.File; tests inject failures.
type auditFile interface {
	io.Writer
	Sync() error
	Truncate(size int64) error
	Close() error
}

// FileSink is the first Sink, and the durable one: it appends hash-chained
// JSON lines to a file, rotating it by size, at the configured durability,
// with keyed checkpoints (checkpoint.go) and a free-space floor
// (diskfree.go). It is safe for concurrent use.
//
// Chain: every line ends with "seq" (1, 2, … within a file) and "prev_hash",
// the hex SHA-256 of the previous line's bytes without its newline. The first
// line of the first file has 64 zeros; the first line of a rotated-to file
// carries the hash of the last line of the file before it, so the chain runs
// across files while seq restarts at 1 in each. On reopen the sink continues
// the existing file's chain.
//
// A failed write leaves the chain as it was: bytes of a partial line are cut
// off again (now, or before the next write), the event is not counted in the
// chain and the caller gets ErrAuditUnavailable. The next write that succeeds
// continues the chain, so the sink recovers by itself when the disk does.
type FileSink struct {
	cfg  AuditConfig
	log  *slog.Logger
	m    AuditMetrics
	open func(name string) (auditFile, error)

	mu      sync.Mutex
	f       auditFile // nil after a failed reopen; retried on the next write
	size    int64     // bytes of complete lines in f
	seq     int64     // seq of the last line in f
	prev    [sha256.Size]byte
	dirty   bool // f may hold bytes past size from a failed write
	failing bool // the last write failed (for one log line per outage)
	closed  bool

	// Result lines (db.session.query.result) have no durability
	// requirement: in write and fsync modes they are chained at once but
	// written with the next durable write (a query line, a session event),
	// by a timer after resultFlushDelay, by Flush, or at Close. pend holds
	// them; size/seq/prev already count them, pendSize/pendSeq/pendPrev are
	// the state of the file without them (restored if their write fails).
	pend     []byte
	pendN    int
	pendSize int64
	pendSeq  int64
	pendPrev [sha256.Size]byte
	flushT   *time.Timer
	flushOn  bool // flushT is armed

	// Group commit (write and fsync modes). A line is chained and staged
	// in pend under mu; a caller that finds no write in flight becomes the
	// writer: it takes everything staged, writes it with one write(2) (and
	// one fsync) with mu released, and wakes the callers whose lines it
	// wrote. Lines staged meanwhile go with the next write, so concurrent
	// sessions share writes and mu is never held across that I/O. While
	// writing, pendSize/pendSeq/pendPrev already describe the file as the
	// write will leave it. The rare paths (reopen, cut, rotation) first let
	// staged lines out (drainLocked) and then write under mu as before.
	writing  bool
	cond     sync.Cond // on mu: a write finished
	waiters  []*waiter // callers of the durable lines in pend
	pendDur  int       // durable lines in pend (pendN counts all)
	spare    []byte    // the last batch's buffer, for the next pend
	spareW   []*waiter
	waiterPl sync.Pool

	// async mode
	amu     sync.RWMutex // guards sending on ch against Close
	aclosed bool         // ch is closed; under amu
	ch      chan *[]byte
	done    chan struct{}

	linePool // line buffers

	// Keyed checkpoints (checkpoint.go); cpOn is false without a key.
	cpOn     bool
	cpKey    CheckpointKey
	cpNode   string
	cpSince  int // lines chained since the last checkpoint; under mu
	cpStop   chan struct{}
	cpDone   chan struct{}
	cpClosed sync.Once

	// Free-space floor (diskfree.go). rotatedBytes and openSize (the
	// file's size at open) are under mu and make bytesTotal.
	disk         *diskWatch
	rotatedBytes int64
	openSize     int64

	// rotateKeep (WithShipper) says how many rotated files to keep, at
	// least MaxFiles; nil keeps MaxFiles.
	rotateKeep func(path string, maxFiles int) int
}

// OpenFileSink opens (creating it 0600 if needed) the audit file of cfg and
// continues its chain. m and log may be nil; of opts it takes
// WithCheckpointKey. A torn last line (a crash in the middle of a write) is
// cut off with a warning; a last line that is not a pgward audit event is an
// error: move the file aside. OpenAudit calls it; call it directly to put
// the file sink behind NewAudit with other sinks.
func OpenFileSink(cfg AuditConfig, m AuditMetrics, log *slog.Logger, opts ...AuditOption) (*FileSink, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if err := CheckAudit(cfg); err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	a := &FileSink{cfg: cfg.WithDefaults(), log: log, m: orNoMetrics(m), open: openAuditFile}
	a.waiterPl.New = func() any { return new(waiter) }
	a.cond.L = &a.mu
	if fi, err := os.Lstat(a.cfg.Path); err == nil && fi.Mode()&os.ModeSymlink != 0 {
		return nil, fmt.Errorf("audit.path %s is a symbolic link: pgward does not follow one (it could point the audit trail anywhere); set audit.path to the file itself", a.cfg.Path)
	}
	var o auditOptions
	for _, opt := range opts {
		opt(&o)
	}
	if o.cpKey.valid() {
		a.cpOn, a.cpKey = true, o.cpKey
	}
	a.rotateKeep = o.rotateKeep
	if a.cpOn {
		a.cpNode, _ = os.Hostname()
		if a.cpNode == "" {
			a.cpNode = "unknown"
		}
	}
	if err := a.recover(); err != nil {
		return nil, err
	}
	f, err := a.open(a.cfg.Path)
	if err != nil {
		return nil, fmt.Errorf("open audit file: %w", err)
	}
	a.f = f
	a.openSize = a.size
	a.startDiskWatch()
	a.m.AuditStorage(a.storageStats)
	if a.cfg.Durability == DurabilityAsync {
		a.ch = make(chan *[]byte, asyncQueueLen)
		a.done = make(chan struct{})
		go a.writeLoop()
	}
	if a.cpOn {
		a.cpStop, a.cpDone = make(chan struct{}), make(chan struct{})
		go a.checkpointLoop()
	}
	return a, nil
}

// openAuditFile opens the audit file for appending. It never follows a
// symbolic link (O_NOFOLLOW), at start, at reopen or after rotation.
func openAuditFile(name string) (auditFile, error) {
	f, err := os.OpenFile(name, os.O_WRONLY|os.O_APPEND|os.O_CREATE|syscall.O_NOFOLLOW, 0o600)
	if errors.Is(err, syscall.ELOOP) {
		return nil, fmt.Errorf("%s is a symbolic link, which pgward does not follow: %w", name, err)
	}
	return f, err
}

// recover reads the chain state (size, seq, prev) of an existing file.
func (a *FileSink) recover() error {
	path := a.cfg.Path
	last, size, torn, err := readLastLine(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return fmt.Errorf("read audit file: %w", err)
	}
	if torn > 0 {
		a.log.Warn("audit file ends in a partial line from an interrupted write; cutting it off",
			"path", path, "bytes", torn)
		if err := os.Truncate(path, size); err != nil {
			return fmt.Errorf("cut partial line of audit file: %w", err)
		}
	}
	if last != nil {
		seq, _, err := chainFields(last)
		if err != nil {
			return fmt.Errorf("audit file %s: last line is not a pgward audit event (%w); move the file aside", path, err)
		}
		a.size, a.seq, a.prev = size, seq, sha256.Sum256(last)
		if !bytes.HasPrefix(last, []byte(`{"event":"`+EventCheckpoint+`"`)) {
			a.cpSince = 1 // the next checkpoint covers what is there
		}
		return nil
	}
	// Empty or new file: link to the newest rotated file, if any.
	last, _, _, err = readLastLine(path + ".1")
	if err == nil && last != nil {
		a.prev = sha256.Sum256(last)
	}
	return nil
}

// readLastLine returns the last complete line of the file (without newline),
// the size up to the end of it, and how many bytes follow it without a newline.
func readLastLine(path string) (last []byte, size, torn int64, err error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, 0, 0, err
	}
	defer f.Close()
	return lastLineOf(f)
}

// lastLineOf is readLastLine of an open file.
func lastLineOf(f *os.File) (last []byte, size, torn int64, err error) {
	st, err := f.Stat()
	if err != nil {
		return nil, 0, 0, err
	}
	end := st.Size()
	const chunk = 64 << 10
	var tail []byte // bytes from some offset to end
	off := end
	for {
		// Find the last newline, then the one before it.
		if i := bytes.LastIndexByte(tail, '\n'); i >= 0 {
			lineEnd := off + int64(i) // offset of the last newline
			torn = end - lineEnd - 1
			if j := bytes.LastIndexByte(tail[:i], '\n'); j >= 0 || off == 0 {
				return append([]byte(nil), tail[j+1:i]...), lineEnd + 1, torn, nil
			}
		} else if off == 0 {
			return nil, 0, end, nil // no complete line
		}
		n := min(int64(chunk), off)
		off -= n
		buf := make([]byte, n, n+int64(len(tail)))
		if _, err := f.ReadAt(buf, off); err != nil {
			return nil, 0, 0, err
		}
		tail = append(buf, tail...)
	}
}

// Append writes one event (Sink). Result events (Kind.Deferrable) are chained
// at once and written with the next durable write, or within
// resultFlushDelay; every other event is written (and in fsync mode synced)
// before Append returns. In async mode it queues and never fails.
func (a *FileSink) Append(e Event) error {
	b := a.getBuf()
	*b = append(*b, e.Body...)
	return a.commit(e.Kind, b)
}

// AppendBatch writes the db.session.query events of one client read
// together (Sink): one write(2) and one fsync, shared with other sessions'
// lines; it succeeds only if all of them were written.
func (a *FileSink) AppendBatch(es []Event) error {
	var small [8]*[]byte
	bodies := small[:0]
	for _, e := range es {
		b := a.getBuf()
		*b = append(*b, e.Body...)
		bodies = append(bodies, b)
	}
	if len(es) == 0 {
		return nil
	}
	return a.commitBatch(es[0].Kind, bodies)
}

// commit appends the chain fields to body (an event object without its
// closing brace), writes it, and recycles the buffer. In async mode it queues
// and never fails.
func (a *FileSink) commit(event EventKind, body *[]byte) error {
	if a.ch != nil {
		a.amu.RLock()
		defer a.amu.RUnlock()
		if a.aclosed {
			a.putBuf(body)
			a.dropped(1)
			return nil
		}
		select {
		case a.ch <- body:
		default:
			a.putBuf(body)
			a.dropped(1)
		}
		return nil
	}
	a.mu.Lock()
	var err error
	switch {
	case a.unusualLocked(int64(len(*body))+110, event.Deferrable()):
		a.drainLocked()
		if event.Deferrable() {
			err = a.deferLocked(body)
		} else {
			err = a.writeLocked(body)
			a.checkpointIfDueLocked()
		}
	case event.Deferrable():
		a.stageLocked(body)
		a.armFlushLocked()
	default:
		start := len(a.pend)
		a.stageLocked(body)
		a.pendDur++
		cp := a.stageCheckpointIfDueLocked()
		err = a.awaitLocked(start)
		a.checkpointDoneLocked(cp, err)
	}
	a.mu.Unlock()
	a.putBuf(body)
	return err
}

// waiter is a caller waiting for its staged lines to be written.
type waiter struct {
	start, end int // its lines are pend[start:end]
	done       bool
	err        error
}

// unusualLocked says whether n more bytes must take the rare path: a closed
// sink, a file to reopen or cut back, a rotation, or (result lines) a large
// backlog.
func (a *FileSink) unusualLocked(n int64, result bool) bool {
	return a.closed || a.f == nil || a.dirty ||
		(a.size > 0 && a.size+n > a.cfg.MaxSize) ||
		(result && len(a.pend) > maxPendingBytes)
}

// drainLocked returns once no write is in flight and no staged line has a
// caller waiting for it, writing them itself if need be.
func (a *FileSink) drainLocked() {
	for a.writing || len(a.waiters) > 0 {
		if a.writing {
			a.cond.Wait()
			continue
		}
		_ = a.flushLocked()
	}
}

// stageLocked chains a line and appends it to pend.
func (a *FileSink) stageLocked(body *[]byte) {
	if a.pendN == 0 && !a.writing {
		a.pendSize, a.pendSeq, a.pendPrev = a.size, a.seq, a.prev
	}
	line := appendChainFields(*body, a.seq+1, &a.prev)
	a.prev = sha256.Sum256(line)
	a.seq++
	a.cpSince++
	*body = line
	a.pend = append(append(a.pend, line...), '\n')
	a.pendN++
	a.size += int64(len(line)) + 1
}

// armFlushLocked makes sure staged result lines are written within
// resultFlushDelay even when no durable write comes to take them.
func (a *FileSink) armFlushLocked() {
	if !a.flushOn {
		a.flushOn = true
		if a.flushT == nil {
			a.flushT = time.AfterFunc(resultFlushDelay, func() { _ = a.Flush() })
		} else {
			a.flushT.Reset(resultFlushDelay)
		}
	}
}

// awaitLocked waits until the durable lines just staged are written,
// writing them (and whatever else is staged) itself when no write is in
// flight. It returns what their write returned.
func (a *FileSink) awaitLocked(start int) error {
	w := a.waiterPl.Get().(*waiter)
	*w = waiter{start: start, end: len(a.pend)}
	a.waiters = append(a.waiters, w)
	return a.waitLocked(w)
}

// waitLocked waits until w's lines are written (see awaitLocked) and
// recycles w.
func (a *FileSink) waitLocked(w *waiter) error {
	for !w.done {
		if a.writing {
			a.cond.Wait()
			continue
		}
		_ = a.flushLocked()
	}
	err := w.err
	*w = waiter{}
	a.waiterPl.Put(w)
	return err
}

// flushLocked writes everything staged with one write(2) (and fsync) and
// settles the callers waiting for it. mu is held on entry and on return but
// released for the I/O; no write may be in flight.
//
// When the write fails (a full disk), what reached the file is cut off and
// the lines are written again one by one, as far as they go: every line
// before the first that fails stays, as it would have without group commit,
// and the callers of those after it get the error. Lines staged while this
// went on chain from lines that are no longer coming, so they fail too; the
// chain is left as the file has it.
func (a *FileSink) flushLocked() error {
	if a.pendN == 0 {
		return nil
	}
	if a.f == nil || a.closed {
		// Not reached: lines are staged only with a file open, and Close
		// writes them before it closes. Fail them rather than write nowhere.
		err := a.writeFailed(ErrAuditClosed)
		for _, w := range a.waiters {
			w.done, w.err = true, err
		}
		a.dropped(a.pendN - a.pendDur)
		a.size, a.seq, a.prev = a.pendSize, a.pendSeq, a.pendPrev
		a.pend, a.waiters, a.pendN, a.pendDur = a.pend[:0], a.waiters[:0], 0, 0
		a.cond.Broadcast()
		return err
	}
	buf, ws, n := a.pend, a.waiters, a.pendN
	baseSize, baseSeq, basePrev := a.pendSize, a.pendSeq, a.pendPrev
	f := a.f
	a.pend, a.waiters, a.spare, a.spareW = a.spare[:0], a.spareW[:0], nil, nil
	a.pendN, a.pendDur = 0, 0
	a.pendSize, a.pendSeq, a.pendPrev = a.size, a.seq, a.prev
	a.writing = true
	a.mu.Unlock()
	kept, dirty, err := a.writeOut(f, buf, baseSize)
	a.mu.Lock()
	a.writing = false
	if err == nil {
		for _, w := range ws {
			w.done = true
		}
		a.writeOK()
	} else {
		err = a.writeFailed(err)
		a.dirty = a.dirty || dirty
		lost := 0 // durable lines not written
		for _, w := range ws {
			w.done = true
			if w.end > kept {
				w.err = err
				lost += bytes.Count(buf[max(w.start, kept):w.end], []byte{'\n'})
			}
		}
		keptLines := bytes.Count(buf[:kept], []byte{'\n'})
		dropped := (n - keptLines) - lost // result lines not written
		// What was staged meanwhile chains from lines that were not written.
		for _, w := range a.waiters {
			w.done, w.err = true, err
		}
		dropped += a.pendN - a.pendDur
		a.dropped(dropped)
		a.size, a.seq, a.prev = baseSize+int64(kept), baseSeq+int64(keptLines), basePrev
		if kept > 0 {
			last := buf[:kept-1]
			a.prev = sha256.Sum256(last[bytes.LastIndexByte(last, '\n')+1:])
		}
		a.pendSize, a.pendSeq, a.pendPrev = a.size, a.seq, a.prev
		a.pend, a.waiters, a.pendN, a.pendDur = a.pend[:0], a.waiters[:0], 0, 0
	}
	clear(ws)
	if cap(buf) <= 4*maxPendingBytes {
		a.spare = buf[:0]
	}
	a.spareW = ws[:0]
	a.cond.Broadcast()
	return err
}

// writeOut writes buf (whole lines) at the end of f, which is size bytes
// long, and fsyncs in fsync mode. On failure it cuts f back and writes the
// lines one by one as far as they go; kept is how many bytes of buf are in
// f, dirty says that f could not be cut back to size+kept. It runs without
// mu (the caller holds the write: a.writing).
func (a *FileSink) writeOut(f auditFile, buf []byte, size int64) (kept int, dirty bool, err error) {
	put := func(b []byte) (int, error) {
		m, err := f.Write(b)
		if err == nil && a.cfg.Durability == DurabilityFsync {
			if err = f.Sync(); err != nil {
				return len(b), fmt.Errorf("fsync: %w", err)
			}
		}
		return m, err
	}
	m, err := put(buf)
	if err == nil {
		return len(buf), false, nil
	}
	if m > 0 && f.Truncate(size) != nil {
		return 0, true, err
	}
	for kept < len(buf) {
		line := buf[kept : kept+bytes.IndexByte(buf[kept:], '\n')+1]
		m, lerr := put(line)
		if lerr != nil {
			if m > 0 && f.Truncate(size+int64(kept)) != nil {
				dirty = true
			}
			return kept, dirty, lerr
		}
		kept += len(line)
	}
	return kept, false, nil // the write failed, its retry did not
}

// deferLocked chains a result line and keeps it for the next write. The
// unusual cases (reopen, cut, rotation, a large backlog) write at once. No
// write may be in flight (drainLocked).
func (a *FileSink) deferLocked(body *[]byte) error {
	if a.unusualLocked(int64(len(*body))+110, true) {
		return a.writeLocked(body)
	}
	a.stageLocked(body)
	a.armFlushLocked()
	return nil
}

// Flush writes the result lines waiting for a durable write (Sink). Tests
// that read the file right after QueryDone call it; a timer calls it within
// resultFlushDelay, Close calls it.
func (a *FileSink) Flush() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.flushOn = false
	for a.writing {
		a.cond.Wait()
	}
	if a.pendN == 0 || a.closed || a.f == nil {
		return nil
	}
	if a.dirty {
		if err := a.f.Truncate(a.pendSize); err != nil {
			return a.writeFailed(fmt.Errorf("cut partial line: %w", err))
		}
		a.dirty = false
	}
	return a.flushLocked()
}

// retryPendLocked handles a failed write that began with the pending
// lines (n bytes of it may be in the file): it cuts the file back and
// writes the pending lines alone, keeping them if that succeeds.
func (a *FileSink) retryPendLocked(n int) {
	if n > 0 {
		if err := a.f.Truncate(a.pendSize); err != nil {
			a.dirty = true
			a.failPendLocked(0)
			return
		}
	}
	m, err := a.f.Write(a.pend)
	if err != nil {
		a.failPendLocked(m)
		return
	}
	a.pend, a.pendN = a.pend[:0], 0
}

// failPendLocked undoes the chain state of pending lines whose write
// failed (n bytes of it may be in the file) and counts them lost.
func (a *FileSink) failPendLocked(n int) {
	if a.pendN == 0 {
		return
	}
	a.size, a.seq, a.prev = a.pendSize, a.pendSeq, a.pendPrev
	a.dropped(a.pendN)
	a.pend, a.pendN = a.pend[:0], 0
	if n > 0 {
		a.dirty = a.f.Truncate(a.size) != nil
	}
}

// commitBatch writes the lines of bodies together (one write(2) and one
// fsync, shared with other sessions' lines), and succeeds only if all of
// them were written. On an error none of the statements may be forwarded;
// a full disk may still have taken the first lines of the batch (audited,
// never run: the safe side). In async mode it queues each.
func (a *FileSink) commitBatch(event EventKind, bodies []*[]byte) error {
	if a.ch != nil || len(bodies) == 1 {
		var err error
		for _, b := range bodies {
			if e := a.commit(event, b); e != nil && err == nil {
				err = e
			}
		}
		return err
	}
	var t StageTicket
	a.stageBodies(bodies, &t)
	return a.WaitStaged(&t)
}

// StageBatch is the first half of AppendBatch (Stager): the lines are
// chained and staged for the next write, which it does not wait for. The
// rare paths (a reopen, a cut, a rotation) and async mode store them
// before it returns; WaitStaged then reports how that went.
func (a *FileSink) StageBatch(es []Event, t *StageTicket) {
	*t = StageTicket{}
	if len(es) == 0 {
		return
	}
	var small [8]*[]byte
	bodies := small[:0]
	for _, e := range es {
		b := a.getBuf()
		*b = append(*b, e.Body...)
		bodies = append(bodies, b)
	}
	if a.ch != nil {
		t.err = a.commitBatch(es[0].Kind, bodies) // queued
		return
	}
	a.stageBodies(bodies, t)
}

// stageBodies stages (or, on a rare path, writes) durable lines and
// recycles their buffers.
func (a *FileSink) stageBodies(bodies []*[]byte, t *StageTicket) {
	total := int64(0)
	for _, b := range bodies {
		total += int64(len(*b)) + 110
	}
	a.mu.Lock()
	if a.unusualLocked(total, false) {
		a.drainLocked()
		t.err = a.writeBatchLocked(bodies)
		a.checkpointIfDueLocked()
	} else {
		start := len(a.pend)
		for _, b := range bodies {
			a.stageLocked(b)
		}
		a.pendDur += len(bodies)
		t.cp = a.stageCheckpointIfDueLocked()
		t.w = a.waiterPl.Get().(*waiter)
		*t.w = waiter{start: start, end: len(a.pend)}
		a.waiters = append(a.waiters, t.w)
	}
	a.mu.Unlock()
	for _, b := range bodies {
		a.putBuf(b)
	}
}

// WaitStaged returns once the lines of t are written (with everything
// staged before it, in one write(2) when no write is in flight), with what
// their write returned (Stager).
func (a *FileSink) WaitStaged(t *StageTicket) error {
	if t.w == nil {
		err := t.err
		*t = StageTicket{}
		return err
	}
	a.mu.Lock()
	err := a.waitLocked(t.w)
	a.checkpointDoneLocked(t.cp, err)
	a.mu.Unlock()
	*t = StageTicket{}
	return err
}

// writeBatchLocked is writeLocked for several lines. a.mu is held.
func (a *FileSink) writeBatchLocked(bodies []*[]byte) error {
	total := int64(0)
	for _, b := range bodies {
		total += int64(len(*b)) + 110
	}
	if a.closed || a.f == nil || a.dirty || (a.size > 0 && a.size+total > a.cfg.MaxSize) {
		// The unusual cases (reopen, cut, rotation) go line by line.
		for _, b := range bodies {
			if err := a.writeLocked(b); err != nil {
				return err
			}
		}
		return nil
	}
	out := a.getBuf()
	defer a.putBuf(out)
	*out = append(*out, a.pend...) // result lines waiting for a durable write
	seq, prev := a.seq, a.prev
	var lens [16]int
	origLen := lens[:0]
	for _, b := range bodies {
		origLen = append(origLen, len(*b))
		line := appendChainFields(*b, seq+1, &prev)
		prev = sha256.Sum256(line)
		seq++
		*b = line
		*out = append(append(*out, line...), '\n')
	}
	n, err := a.f.Write(*out)
	if err == nil && a.cfg.Durability == DurabilityFsync {
		if err = a.f.Sync(); err != nil {
			err = fmt.Errorf("fsync: %w", err)
			n = len(*out)
		}
	}
	if err != nil {
		if a.pendN > 0 {
			// As in writeLine: the pending lines alone, then line by line.
			a.retryPendLocked(n)
			if !a.dirty {
				for i, b := range bodies {
					*b = (*b)[:origLen[i]]
				}
				for _, b := range bodies {
					if err := a.writeLocked(b); err != nil {
						return err
					}
				}
				return nil
			}
		} else if n > 0 {
			a.dirty = a.f.Truncate(a.size) != nil
		}
		return a.writeFailed(err)
	}
	a.size += int64(len(*out) - len(a.pend))
	a.cpSince += int(seq - a.seq)
	a.seq, a.prev = seq, prev
	a.pend, a.pendN = a.pend[:0], 0
	a.writeOK()
	return nil
}

func (a *FileSink) writeLoop() {
	defer close(a.done)
	for b := range a.ch {
		a.mu.Lock()
		err := a.writeLocked(b)
		a.checkpointIfDueLocked()
		a.mu.Unlock()
		if err != nil {
			a.dropped(1)
		}
		a.putBuf(b)
	}
}

func (a *FileSink) dropped(n int) {
	if n > 0 {
		a.m.AuditDropped(n)
	}
}

// writeLocked writes one line. a.mu is held.
func (a *FileSink) writeLocked(body *[]byte) error {
	if err := a.writeLine(body); err != nil {
		return a.writeFailed(err)
	}
	a.writeOK()
	return nil
}

// writeFailed counts and logs (once per outage) a failed write. a.mu is held.
func (a *FileSink) writeFailed(err error) error {
	a.m.AuditWriteFailed()
	if !a.failing {
		a.failing = true
		a.log.Error("audit write failed; refusing new sessions and statements until it succeeds",
			"path", a.cfg.Path, "durability", string(a.cfg.Durability), "error", err)
	}
	return fmt.Errorf("%w: %w", ErrAuditUnavailable, err)
}

// writeOK notes a successful write. a.mu is held.
func (a *FileSink) writeOK() {
	if a.failing {
		a.failing = false
		a.log.Info("audit writes succeed again", "path", a.cfg.Path, "seq", a.seq)
	}
}

func (a *FileSink) writeLine(body *[]byte) error {
	if err := a.prepareLocked(); err != nil {
		return err
	}
	// Rotation needs the line's length first; the chain tail is ≤ 110 bytes.
	if a.size > 0 && a.size+int64(len(*body))+110 > a.cfg.MaxSize {
		if a.pendN > 0 {
			// The waiting result lines belong to this file.
			n, err := a.f.Write(a.pend)
			if err != nil {
				a.failPendLocked(n)
				return err
			}
			a.pend, a.pendN = a.pend[:0], 0
		}
		// The last line of a file is a checkpoint over all of it.
		if a.cpOn && a.cpSince > 0 {
			if err := a.appendCheckpointLocked("rotation"); err != nil {
				return err
			}
		}
		if err := a.rotate(); err != nil {
			return err
		}
	}
	return a.appendLine(body)
}

// prepareLocked makes the file ready for a write: open, and cut back to its
// last complete line. a.mu is held.
func (a *FileSink) prepareLocked() error {
	if a.closed {
		return ErrAuditClosed
	}
	if a.f == nil {
		f, err := a.open(a.cfg.Path)
		if err != nil {
			return fmt.Errorf("reopen audit file: %w", err)
		}
		a.f = f
	}
	if a.dirty {
		size := a.size
		if a.pendN > 0 {
			size = a.pendSize
		}
		if err := a.f.Truncate(size); err != nil {
			return fmt.Errorf("cut partial line: %w", err)
		}
		a.dirty = false
	}
	return nil
}

// appendLine chains body and writes it (with the waiting result lines) at
// the end of the current file. a.mu is held; prepareLocked succeeded.
func (a *FileSink) appendLine(body *[]byte) error {
	line := *body
	bodyLen := len(line)
	line = appendChainFields(line, a.seq+1, &a.prev)
	sum := sha256.Sum256(line)
	line = append(line, '\n')
	*body = line
	out := line
	pl := len(a.pend)
	if a.pendN > 0 {
		// One write(2) for the waiting result lines and this one.
		a.pend = append(a.pend, line...)
		out = a.pend
	}
	n, err := a.f.Write(out)
	if err == nil && a.cfg.Durability == DurabilityFsync {
		if err = a.f.Sync(); err != nil {
			err = fmt.Errorf("fsync: %w", err)
			n = len(out)
		}
	}
	if err != nil {
		if a.pendN > 0 {
			// Do what the sink did before result lines waited: write them
			// first, then try this line alone (re-chained if they failed).
			a.pend = a.pend[:pl]
			a.retryPendLocked(n)
			if a.dirty {
				return err
			}
			*body = (*body)[:bodyLen]
			return a.writeLine(body)
		} else if n > 0 {
			a.dirty = a.f.Truncate(a.size) != nil
		}
		return err
	}
	a.pend, a.pendN = a.pend[:0], 0
	a.size += int64(len(line))
	a.seq++
	a.cpSince++
	a.prev = sum
	return nil
}

// rotate renames Path → Path.1 (shifting older files up, dropping the
// oldest beyond MaxFiles) and opens a fresh Path. The chain hash carries over;
// seq restarts. a.mu is held.
func (a *FileSink) rotate() error {
	path := a.cfg.Path
	if a.cfg.Durability == DurabilityFsync {
		if err := a.f.Sync(); err != nil {
			return fmt.Errorf("fsync before rotation: %w", err)
		}
	}
	keep := a.cfg.MaxFiles
	if a.rotateKeep != nil {
		keep = a.rotateKeep(path, keep)
	}
	_ = os.Remove(path + "." + strconv.Itoa(keep))
	for i := keep - 1; i >= 1; i-- {
		from := path + "." + strconv.Itoa(i)
		if err := os.Rename(from, path+"."+strconv.Itoa(i+1)); err != nil && !errors.Is(err, os.ErrNotExist) {
			a.log.Warn("rotate audit file", "from", from, "error", err)
		}
	}
	if err := os.Rename(path, path+".1"); err != nil {
		// Keep writing to the current file rather than losing events.
		a.log.Warn("rotate audit file; writing on past audit.max_size", "path", path, "error", err)
		return nil
	}
	_ = a.f.Close()
	a.rotatedBytes += a.size
	a.f, a.size, a.seq, a.dirty = nil, 0, 0, false
	f, err := a.open(path)
	if err != nil {
		return fmt.Errorf("open audit file after rotation: %w", err)
	}
	a.f = f
	if a.cfg.Durability == DurabilityFsync {
		if d, err := os.Open(filepath.Dir(path)); err == nil {
			_ = d.Sync()
			_ = d.Close()
		}
	}
	return nil
}

// Close flushes queued events (async), writes the shutdown checkpoint,
// syncs and closes the file (Sink). It is idempotent.
func (a *FileSink) Close() error {
	a.stopDiskWatch()
	if a.cpOn {
		a.cpClosed.Do(func() { close(a.cpStop) })
		<-a.cpDone
	}
	if a.ch != nil {
		a.amu.Lock()
		if !a.aclosed {
			a.aclosed = true
			close(a.ch)
		}
		a.amu.Unlock()
		<-a.done
	}
	_ = a.Flush()
	a.mu.Lock()
	defer a.mu.Unlock()
	// Lines staged since (a session still auditing) go out first; nothing
	// may be writing when the file is closed.
	for a.writing || (a.pendN > 0 && !a.closed && a.f != nil && !a.dirty) {
		if a.writing {
			a.cond.Wait()
			continue
		}
		_ = a.flushLocked()
	}
	if a.cpOn && a.cpSince > 0 && !a.closed && a.prepareLocked() == nil {
		_ = a.appendCheckpointLocked("shutdown")
	}
	a.closed = true
	_ = a.flushLocked() // fails what could not be written (never waits forever)
	if a.flushT != nil {
		a.flushT.Stop()
	}
	if a.f == nil {
		return nil
	}
	err := a.f.Sync()
	if cerr := a.f.Close(); err == nil {
		err = cerr
	}
	a.f = nil
	return err
}
