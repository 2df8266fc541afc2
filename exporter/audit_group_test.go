package exporter

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/pgward/pgward/broker"
)

// Sessions writing at once share write(2)s (group commit), and with the disk
// failing on and off in the middle of it the promise holds line for line: a
// statement whose Query returned nil is in the file, one whose Query failed
// is not, and the chain verifies. Run it with -race.
func TestAuditGroupCommitConcurrent(t *testing.T) {
	for _, d := range []Durability{DurabilityWrite, DurabilityFsync} {
		t.Run(string(d), func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "audit.jsonl")
			a, err := OpenAudit(AuditConfig{Path: path, Durability: d}, nil, nil)
			if err != nil {
				t.Fatal(err)
			}
			ff := &faultyFile{File: a.file().f.(*os.File)}
			a.file().f = ff
			obs := NewObserver(nil, nil, a)
			ctx := context.Background()

			// The disk fails for 1 ms in every 4, ten times, while 12
			// sessions audit statements as fast as they can.
			const sessions = 12
			windows := make(chan struct{})
			go func() {
				defer close(windows)
				for range 10 {
					time.Sleep(3 * time.Millisecond)
					ff.set(d == DurabilityWrite, d == DurabilityFsync, false)
					time.Sleep(time.Millisecond)
					ff.set(false, false, false)
				}
			}()
			var mu sync.Mutex
			ok := map[string]bool{} // "sid/index" → Query returned nil
			var wg sync.WaitGroup
			for s := range sessions {
				wg.Add(1)
				go func() {
					defer wg.Done()
					info := &broker.SessionInfo{RequestID: fmt.Sprintf("r%d", s), SessionID: fmt.Sprintf("s%d", s), Success: true}
					for obs.SessionStart(ctx, info) != nil {
						time.Sleep(100 * time.Microsecond) // started once the disk works
					}
					for i := int64(1); ; i++ {
						select {
						case <-windows:
							return
						default:
						}
						q := &broker.QueryEvent{Index: i, Text: "SELECT 1"}
						err := obs.Query(ctx, info, q)
						if err != nil && !errors.Is(err, ErrAuditUnavailable) {
							t.Errorf("Query: %v", err)
						}
						mu.Lock()
						ok[fmt.Sprintf("%s/%d", info.SessionID, i)] = err == nil
						mu.Unlock()
						if err == nil {
							q.Success, q.Rows = true, 1
							obs.QueryDone(ctx, info, q)
						}
					}
				}()
			}
			wg.Wait()
			if err := a.Close(); err != nil {
				t.Fatal(err)
			}

			f, err := os.Open(path)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			n, err := Verify(f)
			if err != nil {
				t.Fatalf("Verify after %d lines: %v", n, err)
			}
			if _, err := f.Seek(0, 0); err != nil {
				t.Fatal(err)
			}
			inFile := map[string]int{}
			sc := bufio.NewScanner(f)
			sc.Buffer(make([]byte, 1<<20), 1<<20)
			for sc.Scan() {
				var ev struct {
					Event string `json:"event"`
					SID   string `json:"sid"`
					Index int64  `json:"query_index"`
				}
				if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
					t.Fatal(err)
				}
				if ev.Event == EventQuery {
					inFile[fmt.Sprintf("%s/%d", ev.SID, ev.Index)]++
				}
			}
			succeeded, failed := 0, 0
			for k, good := range ok {
				switch {
				case good && inFile[k] != 1:
					t.Errorf("%s: Query returned nil but the file has it %d times", k, inFile[k])
				case !good && inFile[k] != 0:
					t.Errorf("%s: Query failed but the file has it", k)
				}
				if good {
					succeeded++
				} else {
					failed++
				}
			}
			if failed == 0 || succeeded == 0 {
				t.Errorf("%d statements audited, %d refused: the test needs both", succeeded, failed)
			}
			t.Logf("%d lines verify; %d statements audited, %d refused while the disk failed; %d write(2) calls",
				n, succeeded, failed, ff.writes.Load())
		})
	}
}

// budgetFile is a disk with room for limit bytes of audit file: a write
// that does not fit writes what does and fails with ENOSPC.
type budgetFile struct {
	*os.File
	limit int64
}

func (f *budgetFile) Write(p []byte) (int, error) {
	st, err := f.File.Stat()
	if err != nil {
		return 0, err
	}
	room := f.limit - st.Size()
	if int64(len(p)) <= room {
		return f.File.Write(p)
	}
	n, _ := f.File.Write(p[:max(room, 0)])
	return n, syscall.ENOSPC
}

// A batch that does not fit whole keeps the lines that do, in order: the
// result lines waiting ahead of a statement are written, the statement is
// refused, and the chain is the file's.
func TestAuditGroupCommitPartialWrite(t *testing.T) {
	path, a, obs, reg := sinkWithMetrics(t, DurabilityWrite)
	ctx := context.Background()
	s := &broker.SessionInfo{RequestID: "r", SessionID: "s", Success: true}
	if err := obs.SessionStart(ctx, s); err != nil {
		t.Fatal(err)
	}
	qs := make([]*broker.QueryEvent, 3)
	for i := range qs {
		qs[i] = &broker.QueryEvent{Index: int64(i + 1), Text: "SELECT 1"}
		if err := obs.Query(ctx, s, qs[i]); err != nil {
			t.Fatal(err)
		}
	}
	st, _ := os.Stat(path)
	// Three result lines wait for the next durable write; the disk has room
	// for two and a half of them. The sink's own flush (within
	// resultFlushDelay) is kept from writing them first: marked as armed,
	// it arms no timer (CI once saw it write one line before the lock below).
	a.file().mu.Lock()
	a.file().flushOn = true
	a.file().mu.Unlock()
	for _, q := range qs {
		q.Success, q.Rows = true, 1
		obs.QueryDone(ctx, s, q)
	}
	a.file().mu.Lock()
	if n := a.file().pendN; n != 3 {
		a.file().mu.Unlock()
		t.Fatalf("%d result lines staged, want the 3 just completed", n)
	}
	lineLen := int64(len(a.file().pend)) / 3
	a.file().f = &budgetFile{File: a.file().f.(*os.File), limit: st.Size() + lineLen*5/2}
	a.file().mu.Unlock()
	if err := obs.Query(ctx, s, &broker.QueryEvent{Index: 4, Text: "SELECT 4"}); !errors.Is(err, ErrAuditUnavailable) {
		t.Fatalf("Query on a full disk: %v, want ErrAuditUnavailable", err)
	}
	a.file().mu.Lock()
	a.file().f = a.file().f.(*budgetFile).File
	a.file().mu.Unlock()
	if err := obs.Query(ctx, s, &broker.QueryEvent{Index: 5, Text: "SELECT 5"}); err != nil {
		t.Fatalf("Query once the disk has room: %v", err)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	n, err := Verify(bytes.NewReader(b))
	if err != nil {
		t.Fatalf("Verify: %v", err)
	}
	// start, 3 queries, 2 results, query 5
	if n != 7 {
		t.Errorf("%d lines, want 7 (start, queries 1-3, two results, query 5):\n%s", n, b)
	}
	if c := strings.Count(string(b), `"event":"db.session.query.result"`); c != 2 {
		t.Errorf("%d result lines in the file, want the 2 that fit", c)
	}
	if strings.Contains(string(b), "SELECT 4") {
		t.Error("the refused statement's line is in the file")
	}
	if v := counterValue(t, reg, "pgward_audit_events_dropped_total"); v != 1 {
		t.Errorf("audit_events_dropped_total = %v, want 1 (the result line that did not fit)", v)
	}
}

// Close while sessions are auditing: no panic, no caller left waiting, and
// every statement whose Query returned nil is in the file, which verifies.
func TestAuditCloseWhileAuditing(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	a, err := OpenAudit(AuditConfig{Path: path, Durability: DurabilityWrite}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	obs := NewObserver(nil, nil, a)
	ctx := context.Background()
	var mu sync.Mutex
	audited := map[string]bool{}
	var wg sync.WaitGroup
	for s := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			info := &broker.SessionInfo{RequestID: fmt.Sprintf("r%d", s), SessionID: fmt.Sprintf("s%d", s), Success: true}
			if obs.SessionStart(ctx, info) != nil {
				return
			}
			for i := int64(1); ; i++ {
				q := &broker.QueryEvent{Index: i, Text: "SELECT 1"}
				if err := obs.Query(ctx, info, q); err != nil {
					if !errors.Is(err, ErrAuditUnavailable) {
						t.Errorf("Query after Close: %v", err)
					}
					return
				}
				mu.Lock()
				audited[fmt.Sprintf("s%d/%d", s, i)] = true
				mu.Unlock()
				q.Success = true
				obs.QueryDone(ctx, info, q)
			}
		}()
	}
	time.Sleep(20 * time.Millisecond)
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("sessions still waiting 10 s after Close")
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Verify(bytes.NewReader(b)); err != nil {
		t.Fatalf("Verify: %v", err)
	}
	inFile := map[string]bool{}
	for _, line := range bytes.Split(bytes.TrimSpace(b), []byte{'\n'}) {
		var ev struct {
			Event string `json:"event"`
			SID   string `json:"sid"`
			Index int64  `json:"query_index"`
		}
		if err := json.Unmarshal(line, &ev); err != nil {
			t.Fatal(err)
		}
		if ev.Event == EventQuery {
			inFile[fmt.Sprintf("%s/%d", ev.SID, ev.Index)] = true
		}
	}
	for k := range audited {
		if !inFile[k] {
			t.Fatalf("%s was audited (Query returned nil) but is not in the file", k)
		}
	}
	if len(audited) == 0 {
		t.Fatal("no statement was audited before Close")
	}
}

// A batch (the statements of one client read) that fits only in part: the
// statements are refused, the lines that fit stay (audited, never run: the
// safe side), nothing is counted as a dropped result line, and the chain
// is the file's.
func TestAuditBatchPartlyWritten(t *testing.T) {
	path, a, obs, reg := sinkWithMetrics(t, DurabilityWrite)
	ctx := context.Background()
	s := &broker.SessionInfo{RequestID: "r", SessionID: "s", Success: true}
	if err := obs.SessionStart(ctx, s); err != nil {
		t.Fatal(err)
	}
	st, _ := os.Stat(path)
	a.file().mu.Lock()
	a.file().f = &budgetFile{File: a.file().f.(*os.File), limit: st.Size() + st.Size()*3/2} // room for 1.5 lines
	a.file().mu.Unlock()
	qs := []*broker.QueryEvent{
		{Index: 1, Extended: true, Text: "SELECT 1"},
		{Index: 2, Extended: true, Text: "SELECT 2"},
		{Index: 3, Extended: true, Text: "SELECT 3"},
	}
	if err := obs.QueryBatch(ctx, s, qs); !errors.Is(err, ErrAuditUnavailable) {
		t.Fatalf("QueryBatch on a nearly full disk: %v, want ErrAuditUnavailable", err)
	}
	a.file().mu.Lock()
	a.file().f = a.file().f.(*budgetFile).File
	a.file().mu.Unlock()
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(path)
	n, err := Verify(bytes.NewReader(b))
	if err != nil || n != 2 {
		t.Fatalf("Verify = %d, %v; want 2 lines (the start, the batch's first statement):\n%s", n, err, b)
	}
	if v := counterValue(t, reg, "pgward_audit_events_dropped_total"); v != 0 {
		t.Errorf("audit_events_dropped_total = %v, want 0: no result line was waiting", v)
	}
}

// sinkWithMetrics opens a write-or-fsync audit sink in a temporary
// directory, with a registry of its own and an observer on it; the sink is
// closed at the end of the test.
func sinkWithMetrics(t *testing.T, d Durability) (path string, a *Audit, obs *Observer, reg *prometheus.Registry) {
	t.Helper()
	path = filepath.Join(t.TempDir(), "audit.jsonl")
	reg = prometheus.NewRegistry()
	m := NewMetrics(reg)
	a, err := OpenAudit(AuditConfig{Path: path, Durability: d}, m, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = a.Close() })
	return path, a, NewObserver(nil, m, a), reg
}

// counterValue is the value of counter name in reg; the test fails when
// reg has no such counter.
func counterValue(t *testing.T, reg prometheus.Gatherer, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.GetMetric()) == 1 && mf.GetMetric()[0].Counter != nil {
			return mf.GetMetric()[0].GetCounter().GetValue()
		}
	}
	t.Fatalf("no counter %s", name)
	return 0
}

// The event loop stages the statements of the reads of one round and then
// commits them (Stager): the first commit writes every staged line with
// one write(2), the others find theirs written; nothing is written or
// handed to a copy before its commit; a failed write fails every commit
// of it, and the chain goes on.
func TestAuditStagedReadsShareOneWrite(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	fs, err := OpenFileSink(AuditConfig{Path: path, Durability: DurabilityWrite}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	ff := &faultyFile{File: fs.f.(*os.File)}
	fs.f = ff
	copySink := &stagedCopy{}
	a := NewAudit(ParamsFull, nil, nil, fs, copySink)
	obs := NewObserver(nil, nil, a)
	ctx := context.Background()
	var sessions []*session
	for i := range 3 {
		info := &broker.SessionInfo{RequestID: fmt.Sprintf("r%d", i), SessionID: fmt.Sprintf("s%d", i), Success: true}
		if err := obs.SessionStart(ctx, info); err != nil {
			t.Fatal(err)
		}
		sessions = append(sessions, obs.sessionOf(info))
	}
	lines := func() string {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	round := func(tag string) {
		for i, st := range sessions {
			st.StageStatements(ctx, []*broker.QueryEvent{{Index: 1, Text: fmt.Sprintf("SELECT '%s-%d'", tag, i)}})
		}
	}

	before, copied := ff.writes.Load(), copySink.n.Load() // the session starts
	round("one")
	if n := ff.writes.Load() - before; n != 0 || strings.Contains(lines(), "one-") || copySink.n.Load() != copied {
		t.Fatalf("staging wrote %d times, or the file or the copy has a staged line", n)
	}
	for i, st := range sessions {
		if err := st.CommitStatements(ctx); err != nil {
			t.Fatalf("commit %d: %v", i, err)
		}
		if i == 0 {
			for j := range sessions {
				if !strings.Contains(lines(), fmt.Sprintf("one-%d", j)) {
					t.Fatalf("after the first commit, session %d's line is not in the file", j)
				}
			}
		}
	}
	if n := ff.writes.Load() - before; n != 1 {
		t.Fatalf("three staged reads took %d writes, want 1", n)
	}
	if n := copySink.n.Load() - copied; n != 3 {
		t.Fatalf("the copy got %d events after the commits, want 3", n)
	}

	// The write fails: every commit of the round fails, no line of it stays.
	ff.set(true, false, false)
	round("two")
	for i, st := range sessions {
		if err := st.CommitStatements(ctx); !errors.Is(err, ErrAuditUnavailable) {
			t.Fatalf("commit %d with the disk failing: %v", i, err)
		}
	}
	ff.set(false, false, false)
	if strings.Contains(lines(), "two-") || copySink.n.Load()-copied != 3 {
		t.Fatal("a line of the failed round is in the file or the copy")
	}
	round("three")
	for i, st := range sessions {
		if err := st.CommitStatements(ctx); err != nil {
			t.Fatalf("commit %d after the disk recovered: %v", i, err)
		}
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if n, err := VerifyFiles(path); err != nil || n != 3+3+3 {
		t.Fatalf("chain: %d lines, %v; want 9 (3 starts, 2 rounds)", n, err)
	}
}

// stagedCopy is a sink after the audit file that counts what it gets.
type stagedCopy struct{ n atomic.Int64 }

func (c *stagedCopy) Append(Event) error           { c.n.Add(1); return nil }
func (c *stagedCopy) AppendBatch(es []Event) error { c.n.Add(int64(len(es))); return nil }
func (c *stagedCopy) Flush() error                 { return nil }
func (c *stagedCopy) Close() error                 { return nil }
