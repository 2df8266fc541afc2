package exporter_test

import (
	"bufio"
	"context"
	"os"
	"testing"
	"time"

	"github.com/pgward/pgward/exporter"
	"github.com/pgward/pgward/testenv"
)

// linesOf returns the lines of an audit file.
func linesOf(t *testing.T, name string) []string {
	t.Helper()
	f, err := os.Open(name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 16<<20)
	for sc.Scan() {
		out = append(out, sc.Text())
	}
	return out
}

// Rotated audit files deleted by someone else (an operator, a log cleaner;
// not pgward's rotation) before they were delivered: the shipper steps over
// them to the next file and counts exactly their undelivered events in
// pgward_audit_ship_lost_events_total, while pgward runs and across a
// restart, where the deleted file is the one the cursor points into.
func TestShipFilesDeletedBySomeoneElse(t *testing.T) {
	for _, restart := range []bool{false, true} {
		name := "running"
		if restart {
			name = "restart"
		}
		t.Run(name, func(t *testing.T) {
			col := testenv.RequireCollector(t)
			fx := newShipFixture(t, col, exporter.AuditConfig{MaxSize: 32 << 10, MaxFiles: 100}, exporter.ShipGRPC)
			fx.write(t, 20) // less than a file
			waitDelivered(t, col, spoolLines(t, fx.cfg.Path), 15*time.Second)
			waitMetric(t, fx.reg, "pgward_audit_ship_lag_events", 0) // acknowledged: the cursor is at the end
			col.Kill()
			for range 12 {
				fx.write(t, 50)
			}
			files := auditFilesOf(t, fx.cfg.Path) // oldest first; the last is the active file
			if len(files) < 6 {
				t.Fatalf("%d audit files, the test wants at least 6", len(files))
			}
			if restart {
				fx.close()
			}
			// Running: the shipper reads files[0]; delete the two after
			// it. Restart: delete the cursor's file itself and the next.
			gone := files[1:3]
			if restart {
				gone = files[0:2]
			}
			var goneLines []string
			for _, n := range gone {
				goneLines = append(goneLines, linesOf(t, n)...)
				if err := os.Remove(n); err != nil {
					t.Fatal(err)
				}
			}
			if restart {
				fx.open(t)
			}
			if err := col.Start(context.Background()); err != nil {
				t.Fatal(err)
			}
			waitDelivered(t, col, spoolLines(t, fx.cfg.Path), 30*time.Second)
			waitMetric(t, fx.reg, "pgward_audit_ship_lag_events", 0)
			// Lost: the lines of the deleted files that never arrived (a
			// file the shipper has open is still read to its end).
			want := int64(len(goneLines)) - countArrived(t, col, goneLines)
			if want < int64(len(goneLines))/3 {
				t.Fatalf("only %d of the %d lines deleted undelivered; the test wants whole files lost", want, len(goneLines))
			}
			if got := fx.ship.Lost(); got != want {
				t.Errorf("Lost() = %d, want %d (the undelivered lines of the deleted files)", got, want)
			}
			if v := metricValue(t, fx.reg, "pgward_audit_ship_lost_events_total"); v != float64(want) {
				t.Errorf("pgward_audit_ship_lost_events_total = %v, want %d", v, want)
			}
		})
	}
}
