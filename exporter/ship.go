package exporter

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
)

// Shipper tuning. A batch is at most shipBatchLines lines and about
// shipBatchBytes of them (a single longer line goes alone): encoded with
// their attributes (which repeat the statement text) well under the 4 MiB a
// collector's gRPC receiver accepts by default. Bigger batches cost less
// per event (BenchmarkShip: 2048 against 512 lines, about 10% less CPU).
const (
	shipBatchLines = 2048
	shipBatchBytes = 1 << 20
	shipPoll       = 100 * time.Millisecond // how often the spool is looked at when caught up (the lag this adds)
	shipBackoffMin = 100 * time.Millisecond
	shipBackoffMax = 5 * time.Second
	shipLagEvery   = time.Second
)

// Shipper ships the audit trail to an OpenTelemetry Collector, at least
// once, with the audit file as the spool (audit.otlp; see ShipConfig).
//
// It reads complete lines behind the writer, from the delivery cursor on,
// and sends each as an OTLP log record (shipRecord) in batches; only when
// the collector acknowledges a batch does the cursor move and get saved, so
// after a restart or a kill -9 shipping resumes at the first line not
// acknowledged: nothing is skipped, a batch in flight may arrive twice.
// Failed exports are retried with exponential backoff (shipBackoffMin to
// shipBackoffMax, with jitter), for as long as it takes.
//
// Statements never wait for it: the audit writer does not know it exists
// except at rotation, where the shipper decides (rotateKeep, with the audit's
// lock held, a few stat calls) which rotated files must stay because they
// are not delivered yet: up to ShipConfig.MaxUndeliveredBytes beyond
// audit.max_files. Past that cap the oldest undelivered file is deleted, the
// events of it not yet acknowledged are counted in
// pgward_audit_ship_lost_events_total (a batch in flight from it is counted
// even if it arrives) and logged at ERROR.
type Shipper struct {
	cfg      ShipConfig
	path     string
	maxFiles int
	node     string
	log      *slog.Logger
	m        *shipMetrics
	sender   shipSender
	batch    *shipBatch // the request being built (run's goroutine only)

	mu        sync.Mutex
	cur       shipCursor // delivered so far (what StatePath holds)
	haveCur   bool       // cur is known (loaded or located)
	gen       int        // bumped when rotateKeep moves cur past a deleted file
	readInode uint64     // the file being read
	lost      int64
	files     map[string]spoolSpan // rotated files from the cursor's on, by start (saved with cur)
	gapRounds int                  // rounds the file after the one read was seen gone

	ctx     context.Context
	cancel  context.CancelFunc
	done    chan struct{}
	started bool
	closed  sync.Once
}

// NewShipper prepares shipping for the audit configuration a (a.OTLP and
// the OTEL_EXPORTER_OTLP_* environment). m and log may be nil. Start it
// after OpenAudit (WithShipper) and Close it after the audit is closed.
func NewShipper(a AuditConfig, m *Metrics, log *slog.Logger) (*Shipper, error) {
	a = a.WithDefaults()
	var c ShipConfig
	if a.OTLP != nil {
		c = *a.OTLP
	}
	c, err := c.resolve(os.Getenv)
	if err != nil {
		return nil, err
	}
	if c.StatePath == "" {
		c.StatePath = a.Path + ".ship"
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	node, _ := os.Hostname()
	if node == "" {
		node = "unknown"
	}
	s := &Shipper{cfg: c, path: a.Path, maxFiles: a.MaxFiles, node: node, done: make(chan struct{}), batch: newShipBatch(node, a.Path),
		log: log.With("component", "audit-ship", "endpoint", c.Endpoint, "protocol", c.Protocol)}
	if m != nil {
		s.m = m.ship
	} else {
		s.m = newShipMetrics(nil)
	}
	s.sender, err = newShipSender(c, grpc.WithConnectParams(grpc.ConnectParams{
		Backoff: backoff.Config{BaseDelay: shipBackoffMin, Multiplier: 1.6, Jitter: 0.2, MaxDelay: shipBackoffMax},
	}))
	if err != nil {
		return nil, err
	}
	st, ok, err := loadCursor(c.StatePath)
	if err != nil {
		s.log.Warn("audit shipping: " + err.Error())
	}
	s.cur, s.haveCur, s.files = st.shipCursor, ok, st.Files
	if s.files == nil {
		s.files = map[string]spoolSpan{}
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	return s, nil
}

// WithShipper lets s keep rotated audit files it has not delivered yet.
func WithShipper(s *Shipper) AuditOption {
	return func(o *auditOptions) { o.rotateKeep = s.rotateKeep }
}

// Start starts shipping in a goroutine of its own.
func (s *Shipper) Start() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.started {
		return
	}
	s.started = true
	go s.run()
}

// Close stops shipping and waits for the shipper to stop. What is not
// acknowledged yet is shipped at the next start. Idempotent.
func (s *Shipper) Close() error {
	s.closed.Do(func() {
		s.cancel()
		s.mu.Lock()
		started := s.started
		s.started = true // no Start after Close
		s.mu.Unlock()
		if started {
			<-s.done
		}
		_ = s.sender.close()
	})
	return nil
}

// Lost is how many events the shipper gave up on since it started.
func (s *Shipper) Lost() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lost
}

func (s *Shipper) sleep(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-s.ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

func (s *Shipper) run() {
	defer close(s.done)
	var (
		r        *spoolReader
		rgen     int
		maxLines = shipBatchLines
		lagAt    time.Time
	)
	defer func() { r.close() }()
	for s.ctx.Err() == nil {
		s.mu.Lock()
		if r != nil && rgen != s.gen {
			r.close()
			r = nil
		}
		if r == nil {
			r = s.locateLocked()
			rgen = s.gen
		}
		s.mu.Unlock()
		if r == nil {
			s.sleep(shipPoll)
			continue
		}
		if time.Since(lagAt) >= shipLagEvery {
			s.updateLag(r)
			lagAt = time.Now()
		}
		lines, err := r.next(maxLines, shipBatchBytes)
		capped := r.capped
		if err != nil {
			s.log.Error("audit shipping: read audit file", "error", err)
			s.mu.Lock()
			r.close()
			r = nil
			s.mu.Unlock()
			s.sleep(shipBackoffMax)
			continue
		}
		if len(lines) == 0 {
			if s.atEndOfRotated(r) {
				s.mu.Lock()
				var nr *spoolReader
				if rgen == s.gen {
					if nr = s.nextFileLocked(r); nr != nil {
						r.close()
						r = nr
					}
				}
				s.mu.Unlock()
				if nr == nil {
					s.sleep(shipPoll / 10) // the next file is being created
				}
				continue
			}
			s.m.lagEvents.Set(0)
			s.m.lagSeconds.Set(0)
			s.sleep(shipPoll)
			continue
		}
		first, _ := lineTime(lines[0].line)
		req, n := s.request(r.cur.Start, lines)
		delivered, ok := s.deliver(req, n, first)
		if !ok {
			if delivered < 0 && maxLines > 1 { // refused as too large: smaller batches
				maxLines = max(1, len(lines)/2)
			}
			continue
		}
		maxLines = shipBatchLines
		last := lines[len(lines)-1].after
		s.mu.Lock()
		if rgen == s.gen {
			r.advance(last)
			s.cur, s.haveCur = last, true
			s.saveLocked()
		}
		s.mu.Unlock()
		if !capped {
			// Caught up: let lines gather rather than send a handful per
			// export (each costs a round trip and the collector's work).
			s.sleep(shipPoll)
		}
	}
}

// deliver sends req until the collector takes it. ok false: the shipper is
// closing, or (delivered -1) the collector refused the batch as malformed
// or too large and it should be split. A single record refused that way is
// given up on (lost) and counts as delivered, so one bad line cannot stop
// the trail.
func (s *Shipper) deliver(req []byte, n int, first time.Time) (delivered int, ok bool) {
	wait := shipBackoffMin
	for {
		if n == 0 {
			return 0, true // every line of the batch was given up on
		}
		ctx, cancel := context.WithTimeout(s.ctx, s.cfg.Timeout)
		rejected, err := s.sender.send(ctx, req)
		cancel()
		if err == nil {
			s.m.shipped.Add(float64(int64(n) - rejected))
			if rejected > 0 {
				s.addLost(rejected, "the collector rejected records of a batch (partial success)")
			}
			return n, true
		}
		// A failed or cancelled send may leave req queued in the transport
		// for a moment: the next request gets a buffer of its own.
		s.batch.out = nil
		if s.ctx.Err() != nil {
			return 0, false
		}
		s.m.failures.Inc()
		var se *shipError
		if errors.As(err, &se) && se.permanent {
			if n == 1 {
				s.addLost(1, "the collector refused an audit line for good: "+err.Error())
				return 1, true
			}
			return -1, false
		}
		s.updateLag(nil)
		if !first.IsZero() {
			s.m.lagSeconds.Set(time.Since(first).Seconds())
		}
		s.log.Warn("audit shipping: export failed; retrying", "error", err, "retry_in", wait)
		d := wait
		if se != nil && se.after > d {
			d = se.after
		}
		d += time.Duration(rand.Int64N(int64(d)/5 + 1))
		if !s.sleep(d) {
			return 0, false
		}
		wait = min(2*wait, shipBackoffMax)
	}
}

func (s *Shipper) addLost(n int64, why string) {
	s.mu.Lock()
	s.lost += n
	s.mu.Unlock()
	s.m.lost.Add(float64(n))
	s.log.Error("audit shipping: audit events lost to the collector", "events", n, "reason", why)
}

// request encodes the lines as one export request (valid until the next
// call) and says how many records it holds: a line that is not valid UTF-8
// cannot be a protobuf string and is given up on (counted lost).
func (s *Shipper) request(fileStart string, lines []spoolLine) ([]byte, int) {
	now := time.Now()
	b := s.batch
	b.reset()
	var bad int64
	for _, l := range lines {
		if !b.add(l.line, fileStart, now) {
			bad++
		}
	}
	if bad > 0 {
		s.addLost(bad, "audit lines that are not valid UTF-8 cannot be shipped")
	}
	return b.request(), b.n
}

// locateLocked opens the file of the delivery cursor. Without a cursor (or
// with one whose file is gone) it starts at the oldest audit file kept. s.mu
// is held.
func (s *Shipper) locateLocked() *spoolReader {
	files := listSpool(s.path)
	if len(files) == 0 {
		return nil
	}
	open := func(f spoolFile, c shipCursor) *spoolReader {
		r, err := openSpool(f, c)
		if err != nil {
			if !errors.Is(err, errSpoolMoved) {
				s.log.Warn("audit shipping: open audit file", "path", f.name, "error", err)
			}
			return nil // listed again on the next round
		}
		s.readInode = r.inode
		return r
	}
	if s.haveCur {
		var match *spoolFile
		for i := range files {
			if files[i].start == s.cur.Start && (match == nil || files[i].inode == s.cur.Inode) {
				match = &files[i]
			}
		}
		if match != nil {
			return open(*match, s.cur)
		}
		// The cursor's file is gone; if all of it was delivered, the next
		// file starts where delivery stopped.
		for _, f := range files {
			if f.start == s.cur.Last {
				return open(f, shipCursor{Start: f.start, Last: f.start})
			}
		}
		// Deleted by someone else: its undelivered lines, and those of
		// files after it that are gone too, are lost.
		if sp, ok := s.files[s.cur.Start]; ok {
			if f, lost, ok := s.skipGoneLocked(sp.End, files); ok {
				s.lostGoneLocked(lost+max(0, sp.Lines-s.cur.Seq), f.name)
				return open(f, shipCursor{Start: f.start, Last: f.start})
			}
		}
		s.log.Error("audit shipping: the audit file the delivery cursor points into is gone; shipping from the oldest file kept (events in between were not shipped, and their number is unknown)",
			"cursor_seq", s.cur.Seq)
	}
	s.learnLocked(files)
	oldest := files[len(files)-1]
	if oldest.start == "" {
		return nil // no complete line yet
	}
	return open(oldest, shipCursor{Start: oldest.start, Last: oldest.start})
}

// atEndOfRotated reports whether r has read all of a file the writer has
// rotated away from (the active path is another file now).
func (s *Shipper) atEndOfRotated(r *spoolReader) bool {
	fi, err := os.Stat(s.path)
	if err != nil || inodeOf(fi) == r.inode {
		return false
	}
	// Rotated: whatever it got was written before the rename; read again.
	lines, err := r.next(1, shipBatchBytes)
	return err == nil && len(lines) == 0
}

// nextFileLocked opens the file that continues r's chain, or, when that
// file was rotated and is gone (deleted by someone else), the first one
// after it still there, counting the lines skipped as lost. s.mu is held.
func (s *Shipper) nextFileLocked(r *spoolReader) *spoolReader {
	files := listSpool(s.path)
	next, lost, found := spoolFile{}, int64(0), false
	for _, f := range files {
		if f.start == r.cur.Last && f.inode != r.inode {
			next, found = f, true
		}
	}
	if !found {
		// The next file is known rotated (rotateKeep saw it) but not
		// listed. A rotation renaming files while they are listed can hide
		// one for a moment: only a gap seen on gapConfirm rounds in a row
		// is taken for a deletion.
		f, n, ok := s.skipGoneLocked(r.cur.Last, files)
		if !ok || f.inode == r.inode {
			s.gapRounds = 0
			return nil
		}
		if s.gapRounds++; s.gapRounds < gapConfirm {
			return nil
		}
		next, lost = f, n
	}
	s.gapRounds = 0
	nr, err := openSpool(next, shipCursor{Start: next.start, Last: next.start})
	if err != nil {
		return nil // listed again on the next round
	}
	if lost > 0 {
		s.lostGoneLocked(lost, next.name)
	}
	s.readInode = nr.inode
	s.cur, s.haveCur = nr.cur, true
	s.pruneLocked()
	s.saveLocked()
	return nr
}

// gapConfirm is how many rounds (shipPoll/10 apart) a rotated file must be
// missing before the shipper counts it deleted.
const gapConfirm = 3

// skipGoneLocked follows the chain from start through the rotated files
// recorded in s.files to the first file listed. ok false: the chain leaves
// what is recorded before reaching one (nothing is known gone). lost is the
// lines of the files stepped over. s.mu is held.
func (s *Shipper) skipGoneLocked(start string, files []spoolFile) (next spoolFile, lost int64, ok bool) {
	for range len(s.files) + 1 {
		for _, f := range files {
			if f.start == start {
				return f, lost, true
			}
		}
		sp, known := s.files[start]
		if !known {
			return spoolFile{}, 0, false
		}
		lost += sp.Lines
		start = sp.End
	}
	return spoolFile{}, 0, false
}

// lostGoneLocked counts events of audit files someone else deleted before
// they were delivered. s.mu is held.
func (s *Shipper) lostGoneLocked(n int64, resumeAt string) {
	s.lost += n
	s.m.lost.Add(float64(n))
	s.log.Error("audit shipping: audit files were deleted before they were delivered (not by pgward's rotation); their events are lost to the collector",
		"events", n, "resuming_at", resumeAt)
}

// learnLocked records the span of each rotated file listed that s.files
// lacks (files rotated before this shipper ran), then keeps only those from
// the cursor's file on. s.mu is held.
func (s *Shipper) learnLocked(files []spoolFile) {
	for _, f := range files {
		if _, ok := s.files[f.start]; f.index == 0 || f.start == "" || ok {
			continue
		}
		if start, sp, ok := spanOf(f.name, f.inode); ok {
			s.files[start] = sp
		}
	}
	if s.haveCur {
		s.pruneLocked()
	}
}

// pruneLocked drops the spans of files before the cursor's (delivered, or
// given up on). s.mu is held.
func (s *Shipper) pruneLocked() {
	keep := make(map[string]bool, len(s.files))
	for h := s.cur.Start; !keep[h]; {
		sp, ok := s.files[h]
		if !ok {
			break
		}
		keep[h] = true
		h = sp.End
	}
	for h := range s.files {
		if !keep[h] {
			delete(s.files, h)
		}
	}
}

// saveLocked saves the delivery cursor. s.mu is held.
func (s *Shipper) saveLocked() {
	if err := saveCursor(s.cfg.StatePath, s.cur, s.files); err != nil {
		s.log.Warn("audit shipping: save delivery cursor", "path", s.cfg.StatePath, "error", err)
	}
}

// updateLag sets the lag gauges: lines written and not acknowledged, and
// (with r, the reader positioned at the first of them) the age of the
// oldest of them.
func (s *Shipper) updateLag(r *spoolReader) {
	s.mu.Lock()
	cur, inode := s.cur, s.readInode
	s.mu.Unlock()
	var lag int64
	for i := 0; ; i++ {
		name := rotatedName(s.path, i)
		fi, err := os.Stat(name)
		if err != nil {
			if i == 0 {
				continue
			}
			break
		}
		if inodeOf(fi) == inode {
			lag += max(0, lastSeqOf(name)-cur.Seq)
			break
		}
		lag += lastSeqOf(name)
	}
	s.m.lagEvents.Set(float64(lag))
	if lag == 0 {
		s.m.lagSeconds.Set(0)
		return
	}
	if r == nil {
		return // deliver sets the age from its batch
	}
	if lines, err := r.next(1, shipBatchBytes); err == nil && len(lines) > 0 {
		if t, ok := lineTime(lines[0].line); ok {
			s.m.lagSeconds.Set(time.Since(t).Seconds())
		}
	}
}

// rotateKeep is the audit's rotation hook (called with the audit's lock
// held): how many rotated files to keep, maxFiles or more while the file
// being shipped would otherwise be deleted. Past MaxUndeliveredBytes it
// deletes undelivered files, oldest first, and counts their events as lost.
func (s *Shipper) rotateKeep(path string, maxFiles int) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	// The active file is complete (the audit's lock is held): record it
	// before it becomes path.1, so its lines can be counted if someone
	// deletes it undelivered.
	if fi, err := os.Stat(path); err == nil {
		if start, sp, ok := spanOf(path, inodeOf(fi)); ok {
			s.files[start] = sp
			if s.haveCur {
				s.saveLocked()
			}
		}
	}
	if !s.haveCur || s.readInode == 0 {
		return maxFiles
	}
	type rf struct {
		name  string
		inode uint64
		size  int64
	}
	var files []rf // index i = path.i
	c := -1
	for i := 0; ; i++ {
		name := rotatedName(path, i)
		fi, err := os.Stat(name)
		if err != nil {
			if i == 0 {
				files = append(files, rf{name: name})
				continue
			}
			break
		}
		files = append(files, rf{name: name, inode: inodeOf(fi), size: fi.Size()})
		if inodeOf(fi) == s.readInode {
			c = i
		}
	}
	keep := maxFiles
	if c >= maxFiles {
		var spill int64
		for i := maxFiles; i <= c; i++ {
			spill += files[i].size
		}
		for spill > s.cfg.MaxUndeliveredBytes && c >= maxFiles && c >= 1 {
			f := files[c]
			lost := lastSeqOf(f.name)
			if f.inode == s.readInode {
				lost -= s.cur.Seq
			}
			next := files[c-1]
			start := ""
			if nf, err := os.Open(next.name); err == nil {
				start = firstPrevHash(nf)
				nf.Close()
			}
			if start == "" {
				if last, _, _, err := readLastLine(f.name); err == nil && last != nil {
					start = hashHex(last)
				}
			}
			if err := os.Remove(f.name); err != nil {
				break
			}
			spill -= f.size
			c--
			s.lost += lost
			s.m.lost.Add(float64(lost))
			s.log.Error("audit shipping: deleted an undelivered audit file, audit.otlp.max_undelivered_bytes reached; its events are lost to the collector",
				"path", f.name, "events", lost, "max_undelivered_bytes", s.cfg.MaxUndeliveredBytes)
			s.cur = shipCursor{Start: start, Inode: next.inode, Last: start}
			s.readInode = next.inode
			s.gen++
			s.pruneLocked()
			s.saveLocked()
		}
		keep = max(maxFiles, c+1)
	}
	// Files past what is kept are delivered: the audit deletes path.keep,
	// these are older still.
	for i := keep + 1; i < len(files); i++ {
		_ = os.Remove(files[i].name)
	}
	return keep
}

// String describes the shipper for logs (no header values).
func (s *Shipper) String() string {
	return fmt.Sprintf("audit shipper to %s over %s", s.cfg.Endpoint, s.cfg.Protocol)
}
