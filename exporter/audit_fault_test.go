package exporter

import (
	"context"
	"errors"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/pgward/pgward/broker"
)

// faultyFile writes half of each line and then fails with ENOSPC, or fails
// fsync, while its switches are on — a disk that fills up and frees again.
type faultyFile struct {
	*os.File
	writes    atomic.Int64 // Write calls
	mu        sync.Mutex
	failWrite bool
	failSync  bool
	failTrunc bool
}

func (f *faultyFile) set(write, sync, trunc bool) {
	f.mu.Lock()
	f.failWrite, f.failSync, f.failTrunc = write, sync, trunc
	f.mu.Unlock()
}

func (f *faultyFile) Write(p []byte) (int, error) {
	f.writes.Add(1)
	f.mu.Lock()
	fail := f.failWrite
	f.mu.Unlock()
	if fail {
		n, _ := f.File.Write(p[:len(p)/2])
		return n, syscall.ENOSPC
	}
	return f.File.Write(p)
}

func (f *faultyFile) Sync() error {
	f.mu.Lock()
	fail := f.failSync
	f.mu.Unlock()
	if fail {
		return syscall.EIO
	}
	return f.File.Sync()
}

func (f *faultyFile) Truncate(n int64) error {
	f.mu.Lock()
	fail := f.failTrunc
	f.mu.Unlock()
	if fail {
		return syscall.EIO
	}
	return f.File.Truncate(n)
}

func TestAuditWriteFailureRecovers(t *testing.T) {
	tests := []struct {
		name               string
		durability         Durability
		write, sync, trunc bool
	}{
		{"enospc partial write", DurabilityWrite, true, false, false},
		{"enospc and truncate fails too", DurabilityWrite, true, false, true},
		{"fsync fails", DurabilityFsync, false, true, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path, a, obs, reg := sinkWithMetrics(t, tt.durability)
			real := a.file().f.(*os.File)
			ff := &faultyFile{File: real}
			a.file().f = ff
			s := &broker.SessionInfo{RequestID: "r", SessionID: "s", Success: true}
			ctx := context.Background()
			query := func(i int64) error {
				return obs.Query(ctx, s, &broker.QueryEvent{Index: i, Text: "SELECT 1"})
			}
			if err := obs.SessionStart(ctx, s); err != nil {
				t.Fatal(err)
			}
			if err := query(1); err != nil {
				t.Fatal(err)
			}
			ff.set(tt.write, tt.sync, tt.trunc)
			for i := int64(2); i <= 4; i++ {
				if err := query(i); !errors.Is(err, ErrAuditUnavailable) {
					t.Fatalf("Query during failure = %v, want ErrAuditUnavailable", err)
				}
			}
			s2 := &broker.SessionInfo{RequestID: "r2", SessionID: "s2", Success: true}
			if err := obs.SessionStart(ctx, s2); !errors.Is(err, ErrAuditUnavailable) {
				t.Fatalf("SessionStart during failure = %v, want ErrAuditUnavailable", err)
			}
			ff.set(false, false, false)
			if err := query(5); err != nil {
				t.Fatalf("Query after the disk recovered: %v", err)
			}
			if err := obs.SessionStart(ctx, s2); err != nil {
				t.Fatalf("SessionStart after the disk recovered: %v", err)
			}
			if err := a.Close(); err != nil {
				t.Fatal(err)
			}
			f, err := os.Open(path)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			n, err := Verify(f)
			if err != nil || n != 4 {
				t.Fatalf("Verify = %d, %v; want 4 lines (start, query 1, query 5, start 2) and an intact chain", n, err)
			}
			if failures := counterValue(t, reg, "pgward_audit_write_failures_total"); failures != 4 {
				t.Errorf("audit_write_failures_total = %v, want 4", failures)
			}
		})
	}
}

// file is the audit trail's file sink, whose file the tests swap for a
// failing one.
func (a *Audit) file() *FileSink { return a.sink.(*FileSink) }
