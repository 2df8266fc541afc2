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
	audit              atomic.Pointer[Audit]
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
	gauge := func(name, help string, f func(a *Audit) float64) {
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: namespace, Name: name, Help: help}, func() float64 {
			if a := h.audit.Load(); a != nil {
				return f(a)
			}
			return 0
		}))
	}
	gauge("audit_free_bytes", "Bytes available to pgward on the audit directory's file system.", func(a *Audit) float64 {
		free, _ := a.disk.freeBytes()
		return float64(free)
	})
	gauge("audit_min_free_bytes", "The configured floor (audit.min_free_bytes); below it pgward warns.", func(a *Audit) float64 {
		return float64(a.cfg.MinFreeBytes)
	})
	gauge("audit_seconds_until_full", "Estimate of the seconds until the audit file system is full (and new sessions are refused, 58030) at the audit write rate of the last minute; +Inf when nothing is written.", func(a *Audit) float64 {
		free, _ := a.disk.freeBytes()
		return a.disk.secondsUntilFull(free)
	})
	reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{
		Namespace: namespace, Name: "audit_bytes_total", Help: "Bytes appended to the audit trail.",
	}, func() float64 {
		if a := h.audit.Load(); a != nil {
			return float64(a.bytesTotal())
		}
		return 0
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
func (a *Audit) startDiskWatch() {
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

func (a *Audit) stopDiskWatch() {
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
func (a *Audit) checkDisk(now time.Time) {
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

// bytesTotal is how many bytes the sink has appended since it opened
// (lines staged for the next write included).
func (a *Audit) bytesTotal() int64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.rotatedBytes + a.size - a.openSize
}
