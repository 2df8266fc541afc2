package exporter

import (
	"math"
	"path/filepath"
	"sync"
	"syscall"
	"time"
)

// The free-space floor of the audit file system (audit.min_free_bytes).
// Fail-closed refuses every session once the audit file cannot grow, so the
// operator must hear of a filling disk before that: below the floor the sink
// warns (at most once per diskWarnEvery) and the gauges say how many bytes
// are free and, at the recent write rate, how many seconds remain until the
// disk is full. The floor only warns; it never refuses anything.
const (
	// DefaultAuditMinFree is audit.min_free_bytes when unset: 1 GiB.
	DefaultAuditMinFree = 1 << 30
	diskSampleEvery     = 5 * time.Second
	diskRateWindow      = 12 // samples: the rate is over the last minute
	diskWarnEvery       = time.Minute
)

// diskWatch samples the audit sink's bytes and the file system's free space.
type diskWatch struct {
	dir  string
	stop chan struct{}
	done chan struct{}

	mu      sync.Mutex
	samples []diskSample // oldest first, at most diskRateWindow+1
	warned  time.Time
	low     bool
}

type diskSample struct {
	at    time.Time
	bytes int64
}

func (d *diskWatch) freeBytes() (uint64, error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(d.dir, &st); err != nil {
		return 0, err
	}
	return st.Bavail * uint64(st.Bsize), nil
}

// rate is the audit write rate in bytes per second over the samples.
func (d *diskWatch) rate() float64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	if len(d.samples) < 2 {
		return 0
	}
	a, b := d.samples[0], d.samples[len(d.samples)-1]
	dt := b.at.Sub(a.at).Seconds()
	if dt <= 0 || b.bytes <= a.bytes {
		return 0
	}
	return float64(b.bytes-a.bytes) / dt
}

func (d *diskWatch) secondsUntilFull(free uint64) float64 {
	r := d.rate()
	if r <= 0 {
		return math.Inf(1)
	}
	return float64(free) / r
}

// startDiskWatch begins sampling every diskSampleEvery until Close.
func (a *FileSink) startDiskWatch() {
	a.disk = &diskWatch{dir: filepath.Dir(a.cfg.Path), stop: make(chan struct{}), done: make(chan struct{})}
	a.checkDisk(time.Now())
	go func() {
		defer close(a.disk.done)
		t := time.NewTicker(diskSampleEvery)
		defer t.Stop()
		for {
			select {
			case <-a.disk.stop:
				return
			case now := <-t.C:
				a.checkDisk(now)
			}
		}
	}()
}

func (a *FileSink) stopDiskWatch() {
	if a.disk == nil {
		return
	}
	select {
	case <-a.disk.stop:
	default:
		close(a.disk.stop)
	}
	<-a.disk.done
}

// checkDisk takes a sample and warns when free space is under the floor.
func (a *FileSink) checkDisk(now time.Time) {
	d := a.disk
	d.mu.Lock()
	d.samples = append(d.samples, diskSample{now, a.bytesTotal()})
	if len(d.samples) > diskRateWindow+1 {
		d.samples = d.samples[len(d.samples)-diskRateWindow-1:]
	}
	d.mu.Unlock()
	free, err := d.freeBytes()
	if err != nil {
		return
	}
	low := free < uint64(a.cfg.MinFreeBytes)
	d.mu.Lock()
	warn := low && (!d.low || now.Sub(d.warned) >= diskWarnEvery)
	recovered := !low && d.low
	d.low = low
	if warn {
		d.warned = now
	}
	d.mu.Unlock()
	switch {
	case warn:
		a.log.Warn("audit file system is below audit.min_free_bytes: when it is full, every new session is refused (58030)",
			"path", a.cfg.Path, "free_bytes", free, "min_free_bytes", a.cfg.MinFreeBytes,
			"write_bytes_per_second", math.Round(d.rate()), "seconds_until_full", math.Round(d.secondsUntilFull(free)))
	case recovered:
		a.log.Info("audit file system is above audit.min_free_bytes again", "path", a.cfg.Path, "free_bytes", free)
	}
}

// storageStats is the file sink's AuditStorageStats (Metrics.AuditStorage).
func (a *FileSink) storageStats() AuditStorageStats {
	free, _ := a.disk.freeBytes()
	return AuditStorageStats{FreeBytes: free, MinFreeBytes: a.cfg.MinFreeBytes,
		SecondsUntilFull: a.disk.secondsUntilFull(free), BytesTotal: a.bytesTotal()}
}

// bytesTotal is how many bytes the sink has appended since it opened
// (lines staged for the next write included).
func (a *FileSink) bytesTotal() int64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.rotatedBytes + a.size - a.openSize
}
