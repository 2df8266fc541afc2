package exporter_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/pgward/pgward/broker"
	"github.com/pgward/pgward/exporter"
)

// memSink is a second audit destination, written the way a new one is:
// one type implementing exporter.Sink, here keeping its lines in memory
// and sealing them with the same hash chain as the file.
type memSink struct {
	mu     sync.Mutex
	chain  exporter.Chain
	lines  [][]byte
	fail   error // Append fails with it while set
	closed bool
}

func (m *memSink) Append(e exporter.Event) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.usable(); err != nil {
		return err
	}
	m.lines = append(m.lines, m.chain.Seal(nil, e))
	return nil
}

func (m *memSink) AppendBatch(es []exporter.Event) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.usable(); err != nil {
		return err
	}
	for _, e := range es {
		m.lines = append(m.lines, m.chain.Seal(nil, e))
	}
	return nil
}

func (m *memSink) usable() error {
	switch {
	case m.closed:
		return fmt.Errorf("%w: %w", exporter.ErrAuditUnavailable, exporter.ErrAuditClosed)
	case m.fail != nil:
		return fmt.Errorf("%w: %w", exporter.ErrAuditUnavailable, m.fail)
	}
	return nil
}

func (m *memSink) Flush() error { return nil }

func (m *memSink) Close() error {
	m.mu.Lock()
	m.closed = true
	m.mu.Unlock()
	return nil
}

func (m *memSink) setFail(err error) {
	m.mu.Lock()
	m.fail = err
	m.mu.Unlock()
}

// file is the sink's lines as the audit file holds them.
func (m *memSink) file() []byte {
	m.mu.Lock()
	defer m.mu.Unlock()
	var b []byte
	for _, l := range m.lines {
		b = append(append(b, l...), '\n')
	}
	return b
}

var _ exporter.Sink = (*memSink)(nil)

// A sink of another type, alone behind the encoder, receives the lines the
// file sink writes: the golden file's, but for the checkpoint, which is the
// file sink's own. Nothing but the new type and NewAudit is involved.
func TestSinkOfAnotherType(t *testing.T) {
	mem := &memSink{}
	reg := prometheus.NewRegistry()
	m := exporter.NewMetrics(reg)
	obs := exporter.NewObserver(nil, m, exporter.NewAudit(exporter.ParamsFull, m, nil, mem))
	exampleEvents(t, &fixture{obs: obs})
	moreEvents(t, obs)

	got := mem.file()
	if n, err := exporter.Verify(bytes.NewReader(got)); err != nil || n != len(mem.lines) {
		t.Fatalf("Verify of the memory sink's lines = %d, %v; want %d lines and an intact chain", n, err, len(mem.lines))
	}
	golden := filepath.Join("testdata", "audit-golden.jsonl")
	want := mustRead(t, golden)
	want = want[:bytes.LastIndex(want, []byte(`{"event":"`+exporter.EventCheckpoint+`"`))]
	compareLines(t, golden, goldenMask.ReplaceAll(got, []byte(`"$1":"*"`)), want)
	if v := metricValue(t, reg, "pgward_audit_events_total", "event", exporter.EventQuery); v != 6 {
		t.Errorf("audit_events_total{event=%q} = %v, want 6", exporter.EventQuery, v)
	}
}

// Fan-out: a sink added with WithSink receives every line the file gets,
// byte for byte (it seals with the same chain from the same start).
func TestSinkFanOut(t *testing.T) {
	mem := &memSink{}
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	m := exporter.NewMetrics(prometheus.NewRegistry())
	a, err := exporter.OpenAudit(exporter.AuditConfig{Path: path, Parameters: exporter.ParamsFull}, m, nil, exporter.WithSink(mem))
	if err != nil {
		t.Fatal(err)
	}
	obs := exporter.NewObserver(nil, m, a)
	exampleEvents(t, &fixture{obs: obs})
	moreEvents(t, obs)
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	file := mustRead(t, path)
	if len(mem.lines) != 21 {
		t.Fatalf("the second sink got %d lines, want 21", len(mem.lines))
	}
	compareLines(t, path, mem.file(), file)
	if !mem.closed {
		t.Error("Close did not close the second sink")
	}
}

// Fail-closed rests on the durable sink alone. A failing second sink is
// logged once per outage and stops nothing; the file keeps every event. A
// failing durable sink, whatever its type, refuses sessions and statements
// (ErrAuditUnavailable), and then the second sink is not given the event.
func TestSinkFailures(t *testing.T) {
	ctx := context.Background()
	t.Run("second sink fails", func(t *testing.T) {
		mem := &memSink{}
		path := filepath.Join(t.TempDir(), "audit.jsonl")
		logs := &bytes.Buffer{}
		log := slog.New(slog.NewJSONHandler(logs, nil))
		a, err := exporter.OpenAudit(exporter.AuditConfig{Path: path}, nil, log, exporter.WithSink(mem))
		if err != nil {
			t.Fatal(err)
		}
		obs := exporter.NewObserver(log, nil, a)
		s := testSession()
		if err := obs.SessionStart(ctx, s); err != nil {
			t.Fatal(err)
		}
		mem.setFail(syscall.ECONNREFUSED)
		for i := int64(1); i <= 3; i++ {
			if err := obs.Query(ctx, s, &broker.QueryEvent{Index: i, Text: "SELECT 1"}); err != nil {
				t.Fatalf("Query with the second sink failing: %v", err)
			}
		}
		mem.setFail(nil)
		if err := obs.Query(ctx, s, &broker.QueryEvent{Index: 4, Text: "SELECT 1"}); err != nil {
			t.Fatal(err)
		}
		if err := a.Close(); err != nil {
			t.Fatal(err)
		}
		if n := verifyFile(t, path); n != 5 {
			t.Errorf("the audit file has %d lines, want 5 (start and 4 queries)", n)
		}
		if len(mem.lines) != 2 {
			t.Errorf("the second sink has %d lines, want 2 (start and query 4)", len(mem.lines))
		}
		if n := strings.Count(logs.String(), "a sink after the audit file failed"); n != 1 {
			t.Errorf("%d ERROR lines for one outage of the second sink, want 1:\n%s", n, logs)
		}
		if !strings.Contains(logs.String(), "works again") {
			t.Errorf("no line says the second sink recovered:\n%s", logs)
		}
	})
	t.Run("durable sink fails", func(t *testing.T) {
		durable, second := &memSink{}, &memSink{}
		obs := exporter.NewObserver(nil, nil, exporter.NewAudit(exporter.ParamsRedacted, nil, nil, durable, second))
		s := testSession()
		if err := obs.SessionStart(ctx, s); err != nil {
			t.Fatal(err)
		}
		durable.setFail(syscall.ENOSPC)
		if err := obs.Query(ctx, s, &broker.QueryEvent{Index: 1, Text: "SELECT 1"}); !errors.Is(err, exporter.ErrAuditUnavailable) {
			t.Fatalf("Query with the durable sink failing = %v, want ErrAuditUnavailable", err)
		}
		qs := []*broker.QueryEvent{{Index: 2, Text: "SELECT 2"}, {Index: 3, Text: "SELECT 3"}}
		if err := obs.QueryBatch(ctx, s, qs); !errors.Is(err, exporter.ErrAuditUnavailable) {
			t.Fatalf("QueryBatch with the durable sink failing = %v, want ErrAuditUnavailable", err)
		}
		s2 := testSession()
		s2.SessionID = "second"
		if err := obs.SessionStart(ctx, s2); !errors.Is(err, exporter.ErrAuditUnavailable) {
			t.Fatalf("SessionStart with the durable sink failing = %v, want ErrAuditUnavailable", err)
		}
		if len(second.lines) != 1 || len(durable.lines) != 1 {
			t.Errorf("durable %d lines, second %d; want 1 each (the first start only)", len(durable.lines), len(second.lines))
		}
	})
}
