package testenv

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// CollectorEnv names an environment variable that, when set, is the
// OpenTelemetry Collector binary StartCollector runs; otherwise it runs
// bin/otelcol of the repository, building it (`make otelcol`) when missing.
const CollectorEnv = "PGWARD_OTELCOL"

// CollectorModule is the repository directory of the collector's own Go
// module (core otelcol, the OTLP receiver and the contrib file exporter, all
// at one release).
const CollectorModule = "testenv/otelcol"

// Collector is a real OpenTelemetry Collector (bin/otelcol) receiving OTLP
// over gRPC and HTTP on loopback and writing what it receives, logs and
// traces, as JSON lines (one ExportLogsServiceRequest or
// ExportTraceServiceRequest per line) to OutputPath with its file exporter.
// The ports and the output file stay the same across Kill/Start, and the
// file is appended to, so what arrived before a restart is kept.
type Collector struct {
	// GRPCAddr and HTTPAddr are host:port of the OTLP receivers.
	GRPCAddr, HTTPAddr string
	// OutputPath is the file exporter's output.
	OutputPath string
	// LogPath holds the collector's own stdout and stderr.
	LogPath string

	bin, config string
	mu          sync.Mutex
	proc        *os.Process
	done        chan struct{}
}

// CollectorBinary returns the collector binary to run: $PGWARD_OTELCOL, or
// <repo>/bin/otelcol, built first (once, under a file lock, so concurrent
// test binaries share it) when it is missing or older than the module's
// sources. `make test` builds it before the tests run.
func CollectorBinary() (string, error) {
	if p := os.Getenv(CollectorEnv); p != "" {
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Errorf("%s=%s: %w", CollectorEnv, p, err)
		}
		return p, nil
	}
	root, err := repoRoot()
	if err != nil {
		return "", err
	}
	bin := filepath.Join(root, "bin", "otelcol")
	mod := filepath.Join(root, CollectorModule)
	if fresh(bin, mod) {
		return bin, nil
	}
	if err := os.MkdirAll(filepath.Dir(bin), 0o755); err != nil {
		return "", err
	}
	lock, err := os.OpenFile(bin+".lock", os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return "", fmt.Errorf("lock collector build: %w", err)
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		return "", fmt.Errorf("lock collector build: %w", err)
	}
	defer unix.Flock(int(lock.Fd()), unix.LOCK_UN)
	if fresh(bin, mod) {
		return bin, nil
	}
	cmd := exec.Command("go", "build", "-o", bin+".tmp", ".")
	cmd.Dir = mod
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build the collector (cd %s && go build): %w: %s", CollectorModule, err, lastLines(out, 20))
	}
	if err := os.Rename(bin+".tmp", bin); err != nil {
		return "", err
	}
	return bin, nil
}

// fresh reports whether bin exists and is newer than the module's files.
func fresh(bin, mod string) bool {
	bi, err := os.Stat(bin)
	if err != nil {
		return false
	}
	for _, f := range []string{"go.mod", "go.sum", "main.go"} {
		if fi, err := os.Stat(filepath.Join(mod, f)); err == nil && fi.ModTime().After(bi.ModTime()) {
			return false
		}
	}
	return true
}

// repoRoot finds the repository: the directory above the working directory
// holding CollectorModule.
func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, CollectorModule, "go.mod")); err == nil {
			return dir, nil
		}
		up := filepath.Dir(dir)
		if up == dir {
			return "", errors.New("testenv: no " + CollectorModule + " above the working directory; set " + CollectorEnv)
		}
		dir = up
	}
}

// StartCollector starts a collector in dir (its config, output and log go
// there) and returns once both receivers accept connections.
func StartCollector(ctx context.Context, dir string) (*Collector, error) {
	bin, err := CollectorBinary()
	if err != nil {
		return nil, err
	}
	// The ports are picked free and handed to the collector, which binds
	// them a moment later: another process (a test beside this one) may
	// take one first. Then pick again, as the postmaster's start does.
	for attempt := 0; ; attempt++ {
		c, err := startCollectorOnce(ctx, dir, bin)
		if attempt < 4 && errors.Is(err, errCollectorPortInUse) {
			continue
		}
		return c, err
	}
}

// collectorPort picks a receiver's port (a variable for tests).
var collectorPort = freePort

// errCollectorPortInUse: the collector could not bind a receiver's port.
var errCollectorPortInUse = errors.New("collector port in use")

// startCollectorOnce is StartCollector on one pick of free ports.
func startCollectorOnce(ctx context.Context, dir, bin string) (*Collector, error) {
	gp, err := collectorPort()
	if err != nil {
		return nil, err
	}
	hp, err := collectorPort()
	if err != nil {
		return nil, err
	}
	c := &Collector{
		GRPCAddr:   fmt.Sprintf("127.0.0.1:%d", gp),
		HTTPAddr:   fmt.Sprintf("127.0.0.1:%d", hp),
		OutputPath: filepath.Join(dir, "otlp.jsonl"),
		LogPath:    filepath.Join(dir, "otelcol.log"),
		bin:        bin,
		config:     filepath.Join(dir, "otelcol.yaml"),
	}
	// The collector's own metrics are off: their fixed port (8888) would
	// clash between collectors running side by side.
	conf := fmt.Sprintf(`receivers:
  otlp:
    protocols:
      grpc: {endpoint: %q}
      http: {endpoint: %q}
exporters:
  file:
    path: %q
    append: true
    flush_interval: 1ms
service:
  telemetry:
    metrics: {level: none}
    logs: {level: warn}
  pipelines:
    logs: {receivers: [otlp], exporters: [file]}
    traces: {receivers: [otlp], exporters: [file]}
`, c.GRPCAddr, c.HTTPAddr, c.OutputPath)
	if err := os.WriteFile(c.config, []byte(conf), 0o644); err != nil {
		return nil, err
	}
	if err := c.Start(ctx); err != nil {
		return nil, err
	}
	return c, nil
}

// RequireCollector starts a collector for this test in a temporary directory
// and kills it in tb.Cleanup. A collector that cannot be built or started
// fails the test: it is built from the Go module proxy, which every machine
// that runs the tests reaches.
func RequireCollector(tb testing.TB) *Collector {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), StartTimeout)
	defer cancel()
	c, err := StartCollector(ctx, tb.TempDir())
	if err != nil {
		tb.Fatalf("testenv: start collector: %v", err)
	}
	tb.Cleanup(func() { c.Kill() })
	return c
}

// Start (re)starts the collector on its ports and returns once both accept
// connections. The collector gets SIGKILL if the process that started it
// dies.
func (c *Collector) Start(ctx context.Context) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.proc != nil {
		return errors.New("collector already running")
	}
	lf, err := os.OpenFile(c.LogPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	logStart, _ := lf.Seek(0, 2)
	cmd := exec.Command(c.bin, "--config", c.config)
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	done := make(chan struct{})
	started := make(chan error, 1)
	go func() {
		// Pdeathsig fires when the forking thread exits: keep it.
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		_ = cmd.Wait()
		close(done)
	}()
	err = <-started
	lf.Close()
	if err != nil {
		return fmt.Errorf("start collector: %w", err)
	}
	c.proc, c.done = cmd.Process, done
	for {
		if dialable(c.GRPCAddr) && dialable(c.HTTPAddr) {
			return nil
		}
		select {
		case <-done:
			c.proc = nil
			out := readFrom(c.LogPath, logStart)
			if bytes.Contains(out, []byte("address already in use")) {
				return fmt.Errorf("%w: collector exited during startup: %s", errCollectorPortInUse, lastLines(out, 20))
			}
			return fmt.Errorf("collector exited during startup: %s", lastLines(out, 20))
		case <-ctx.Done():
			c.killLocked()
			return fmt.Errorf("wait for collector: %w: %s", ctx.Err(), lastLines(readFrom(c.LogPath, logStart), 20))
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func dialable(addr string) bool {
	conn, err := net.DialTimeout("tcp", addr, 100*time.Millisecond)
	if err != nil {
		return false
	}
	conn.Close()
	return true
}

// Kill ends the collector with SIGKILL (what it had not flushed to
// OutputPath is lost, as in a crash) and waits for it. Idempotent.
func (c *Collector) Kill() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.killLocked()
}

func (c *Collector) killLocked() {
	if c.proc == nil {
		return
	}
	_ = c.proc.Signal(syscall.SIGCONT) // a stalled collector dies as well
	_ = c.proc.Kill()
	<-c.done
	c.proc = nil
}

// Stop ends the collector with SIGTERM, letting it flush, and waits up to
// 10 s before killing it.
func (c *Collector) Stop() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.proc == nil {
		return
	}
	_ = c.proc.Signal(syscall.SIGCONT)
	_ = c.proc.Signal(syscall.SIGTERM)
	select {
	case <-c.done:
		c.proc = nil
	case <-time.After(10 * time.Second):
		c.killLocked()
	}
}

// Stall freezes the collector (SIGSTOP): its sockets stay open and accept
// connections into the backlog, but nothing answers. Resume thaws it.
func (c *Collector) Stall() error  { return c.signal(syscall.SIGSTOP) }
func (c *Collector) Resume() error { return c.signal(syscall.SIGCONT) }

func (c *Collector) signal(sig syscall.Signal) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.proc == nil {
		return errors.New("collector not running")
	}
	return c.proc.Signal(sig)
}

// LogRecord is one log record as the collector wrote it, ids in lower-case
// hex.
type LogRecord struct {
	Body     string
	TraceID  string
	SpanID   string
	Attrs    map[string]any // string, bool, int64, float64
	Resource map[string]any
}

// The OTLP JSON encoding (what the file exporter writes) differs from
// protojson: trace and span ids are hex, not base64. These structs read the
// part of it tests look at.
type (
	otlpJSON struct {
		ResourceLogs []struct {
			Resource struct {
				Attributes []otlpKV `json:"attributes"`
			} `json:"resource"`
			ScopeLogs []struct {
				LogRecords []struct {
					Body       otlpValue `json:"body"`
					TraceID    string    `json:"traceId"`
					SpanID     string    `json:"spanId"`
					Attributes []otlpKV  `json:"attributes"`
				} `json:"logRecords"`
			} `json:"scopeLogs"`
		} `json:"resourceLogs"`
	}
	otlpKV struct {
		Key   string    `json:"key"`
		Value otlpValue `json:"value"`
	}
	otlpValue struct {
		String *string  `json:"stringValue"`
		Int    *string  `json:"intValue"` // int64 is a JSON string in OTLP
		Bool   *bool    `json:"boolValue"`
		Double *float64 `json:"doubleValue"`
	}
)

func (v otlpValue) value() any {
	switch {
	case v.String != nil:
		return *v.String
	case v.Int != nil:
		n, _ := strconv.ParseInt(*v.Int, 10, 64)
		return n
	case v.Bool != nil:
		return *v.Bool
	case v.Double != nil:
		return *v.Double
	}
	return nil
}

func attrMap(kvs []otlpKV) map[string]any {
	m := make(map[string]any, len(kvs))
	for _, kv := range kvs {
		m[kv.Key] = kv.Value.value()
	}
	return m
}

// Logs reads every log record in OutputPath, in file order (duplicates
// included). A last line the exporter has not finished is ignored, and so
// is a request torn by a kill (its records are lost by the collector: its
// file exporter buffers what it has acknowledged for up to flush_interval,
// 1 ms here).
func (c *Collector) Logs() ([]LogRecord, error) {
	data, err := os.ReadFile(c.OutputPath)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	data = data[:bytes.LastIndexByte(data, '\n')+1] // a torn tail is still being written
	var out []LogRecord
	for _, line := range bytes.Split(data, []byte("\n")) {
		if !bytes.Contains(line, []byte(`"resourceLogs"`)) {
			continue // a trace batch, or the end
		}
		var req otlpJSON
		if err := json.Unmarshal(line, &req); err != nil {
			// A collector killed mid-write leaves a torn request, and
			// after a restart the next one follows it on the same line.
			i := bytes.LastIndex(line, []byte(`{"resourceLogs":`))
			if i <= 0 || json.Unmarshal(line[i:], &req) != nil {
				continue
			}
		}
		for _, rl := range req.ResourceLogs {
			res := attrMap(rl.Resource.Attributes)
			for _, sl := range rl.ScopeLogs {
				for _, lr := range sl.LogRecords {
					body, _ := lr.Body.value().(string)
					out = append(out, LogRecord{
						Body: body, TraceID: lr.TraceID, SpanID: lr.SpanID,
						Attrs: attrMap(lr.Attributes), Resource: res,
					})
				}
			}
		}
	}
	return out, nil
}
