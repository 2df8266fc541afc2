package exporter

import (
	"math"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/pgward/pgward/broker"
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

// hostileMetrics are the metrics of issue 13: slot refusals, summarised
// refusals, and the audit file system's free space.
type hostileMetrics struct {
	connRefused        map[string]prometheus.Counter
	connRefusedOther   prometheus.Counter
	refusalsSummarized prometheus.Counter
	storage            atomic.Pointer[func() AuditStorageStats] // the file sink's
}

func newHostileMetrics(reg *prometheus.Registry) *hostileMetrics {
	h := &hostileMetrics{}
	refused := prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Name: "connections_refused_total",
		Help: "Connections refused with 53300 before authentication for want of a slot, by reason (max_connections, per_uid, per_cgroup).",
	}, []string{"reason"})
	reg.MustRegister(refused)
	h.connRefused = map[string]prometheus.Counter{}
	for _, r := range []string{broker.SlotMaxConnections, broker.SlotPerUID, broker.SlotPerCgroup} {
		h.connRefused[r] = refused.WithLabelValues(r)
	}
	h.connRefusedOther = refused.WithLabelValues(reasonOther)
	h.refusalsSummarized = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: namespace, Name: "audit_refusals_summarized_total",
		Help: "Refusals beyond the audit allowance, written only as counts in db.refusal.summary events.",
	})
	reg.MustRegister(h.refusalsSummarized)
	stats := func() (AuditStorageStats, bool) {
		if f := h.storage.Load(); f != nil {
			return (*f)(), true
		}
		return AuditStorageStats{}, false
	}
	gauge := func(name, help string, f func(s AuditStorageStats) float64) {
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: namespace, Name: name, Help: help}, func() float64 {
			if s, ok := stats(); ok {
				return f(s)
			}
			return 0
		}))
	}
	gauge("audit_free_bytes", "Bytes available to pgward on the audit directory's file system.", func(s AuditStorageStats) float64 {
		return float64(s.FreeBytes)
	})
	gauge("audit_min_free_bytes", "The configured floor (audit.min_free_bytes); below it pgward warns.", func(s AuditStorageStats) float64 {
		return float64(s.MinFreeBytes)
	})
	gauge("audit_seconds_until_full", "Estimate of the seconds until the audit file system is full (and new sessions are refused, 58030) at the audit write rate of the last minute; +Inf when nothing is written.", func(s AuditStorageStats) float64 {
		return s.SecondsUntilFull
	})
	reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{
		Namespace: namespace, Name: "audit_bytes_total", Help: "Bytes appended to the audit trail.",
	}, func() float64 {
		s, _ := stats()
		return float64(s.BytesTotal)
	}))
	return h
}

func (h *hostileMetrics) slotRefused(reason string) {
	if c, ok := h.connRefused[reason]; ok {
		c.Inc()
		return
	}
	h.connRefusedOther.Inc()
}

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

// AuditStorageStats is what the audit storage metrics read of the file sink.
type AuditStorageStats struct {
	FreeBytes        uint64  // available on the audit directory's file system (0 if unknown)
	MinFreeBytes     int64   // audit.min_free_bytes
	SecondsUntilFull float64 // at the write rate of the last minute; +Inf when nothing is written
	BytesTotal       int64   // appended since the sink opened
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
