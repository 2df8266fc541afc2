//go:build linux

package exporter_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/pgward/pgward/broker"
	"github.com/pgward/pgward/exporter"
	"github.com/pgward/pgward/testenv"
)

// TestAuditDiskFullRecovers fills a real (tiny tmpfs) disk: writes fail with
// ENOSPC, the sink refuses, and when space comes back it carries on with the
// chain intact. Needs root to mount.
func TestAuditDiskFullRecovers(t *testing.T) {
	if os.Geteuid() != 0 {
		testenv.SkipUnlessCI(t, "needs root to mount a small tmpfs")
	}
	dir := t.TempDir()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "size=64k,mode=0700"); err != nil {
		testenv.SkipUnlessCI(t, "cannot mount tmpfs (%v); runs where root may mount", err)
	}
	t.Cleanup(func() { _ = syscall.Unmount(dir, syscall.MNT_DETACH) })
	filler := filepath.Join(dir, "filler")
	fx := newFixture(t, exporter.AuditConfig{Path: filepath.Join(dir, "audit.jsonl")})
	// Leave room for a few lines only.
	if err := os.WriteFile(filler, make([]byte, 56<<10), 0o600); err != nil {
		t.Fatal(err)
	}
	s := testSession()
	ctx := context.Background()
	ok, failed := 0, 0
	for i := int64(1); i <= 40 && failed < 3; i++ {
		err := fx.obs.Query(ctx, s, &broker.QueryEvent{Index: i, Text: "SELECT 1"})
		switch {
		case err == nil && failed == 0:
			ok++
		case errors.Is(err, exporter.ErrAuditUnavailable) && errors.Is(err, syscall.ENOSPC):
			failed++
		default:
			t.Fatalf("query %d: %v (after %d ok, %d failed)", i, err, ok, failed)
		}
	}
	if ok == 0 || failed == 0 {
		t.Fatalf("%d writes succeeded, %d failed: the disk never filled", ok, failed)
	}
	if got := metricValue(t, fx.reg, "pgward_audit_write_failures_total"); got != float64(failed) {
		t.Errorf("audit_write_failures_total = %v, want %d", got, failed)
	}
	os.Remove(filler) // space comes back
	for i := int64(100); i < 103; i++ {
		if err := fx.obs.Query(ctx, s, &broker.QueryEvent{Index: i, Text: "SELECT 1"}); err != nil {
			t.Fatalf("after space came back: %v", err)
		}
	}
	if n := verifyFile(t, fx.path); n != ok+3 {
		t.Errorf("verified %d lines, want %d", n, ok+3)
	}
}
