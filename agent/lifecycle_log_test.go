package agent

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgward/pgward/broker"
	"github.com/pgward/pgward/testenv"
)

// TestOneLogLinePerLifecycleEvent: a session's lifecycle events — its
// start, its end, a refused login, a cancel request — are each one log
// line, written by the exporter (the broker reports them to its Observer
// and logs none of them itself). Real Postgres, a real pgx client through
// the agent, the agent's JSON log at INFO.
func TestOneLogLinePerLifecycleEvent(t *testing.T) {
	h := newHarness(t, func(h *harness, _ *Config) {
		info := slog.LevelInfo
		h.logLevel = &info
	})
	ctx := context.Background()
	lines := func() []map[string]any {
		var out []map[string]any
		for _, l := range strings.Split(strings.TrimSpace(h.logs.String()), "\n") {
			var m map[string]any
			if err := json.Unmarshal([]byte(l), &m); err != nil {
				t.Fatalf("log line is not JSON: %v: %s", err, l)
			}
			out = append(out, m)
		}
		return out
	}
	// of returns the messages of the lines carrying request_id rid.
	of := func(rid string) []string {
		var msgs []string
		for _, l := range lines() {
			if l["request_id"] == rid {
				msgs = append(msgs, l["level"].(string)+" "+l["msg"].(string))
			}
		}
		return msgs
	}
	// The credential's first use logs what its role can become: a line
	// about the credential, not the session. Use it once before counting.
	warm := h.connect(t, testenv.ScramUser, "orders")
	warm.Close(ctx)

	t.Run("session start and end", func(t *testing.T) {
		c := h.connect(t, testenv.ScramUser, "orders")
		rid := lastSessionStart(t, h)
		if _, err := c.Exec(ctx, "select 1"); err != nil {
			t.Fatal(err)
		}
		c.Close(ctx)
		eventually(t, "the session's end in the log", func() bool { return len(of(rid)) >= 2 })
		time.Sleep(100 * time.Millisecond) // a duplicate would be written right after
		want := []string{"INFO session started", "INFO session ended"}
		if got := of(rid); strings.Join(got, "|") != strings.Join(want, "|") {
			t.Errorf("log lines of the session: %q, want %q", got, want)
		}
	})

	t.Run("forced end", func(t *testing.T) {
		// pgward ends the session (what `pgward sessions end` does): the
		// end's cause is in the one "session ended" line, at WARN, and the
		// broker writes no line of its own about it.
		c := h.connect(t, testenv.ScramUser, "orders")
		defer c.Close(ctx)
		rid := lastSessionStart(t, h)
		var sid string
		for _, ev := range h.auditEvents(t) {
			if ev["event"] == "db.session.start" && ev["request_id"] == rid {
				sid, _ = ev["sid"].(string)
			}
		}
		if _, ok := h.agent.Broker().EndSession(sid, "log drill"); !ok {
			t.Fatalf("no live session %q", sid)
		}
		eventually(t, "the forced end in the log", func() bool { return len(of(rid)) >= 2 })
		time.Sleep(100 * time.Millisecond)
		want := []string{"INFO session started", "WARN session ended"}
		if got := of(rid); strings.Join(got, "|") != strings.Join(want, "|") {
			t.Errorf("log lines of a session pgward ended: %q, want %q", got, want)
		}
		for _, l := range lines() {
			if l["request_id"] == rid && l["msg"] == "session ended" &&
				(l["reason"] != string(broker.EndByOperator) || l["cause"] != "an operator ended this session: log drill") {
				t.Errorf("the end's line lacks its reason or cause: %v", l)
			}
		}
	})

	t.Run("refused login", func(t *testing.T) {
		e := connectErr(t, h.dsn("postgres", "orders"))
		if e.Code != broker.CodeInvalidAuthorization {
			t.Fatalf("refusal %s %s", e.Code, e.Message)
		}
		var rid string
		for _, ev := range h.auditEvents(t) {
			if ev["event"] == "db.session.start" && ev["success"] == false && ev["db_user"] == "postgres" {
				rid, _ = ev["request_id"].(string)
			}
		}
		if rid == "" {
			t.Fatal("the refusal was not audited")
		}
		time.Sleep(100 * time.Millisecond)
		want := []string{"WARN authentication refused"}
		if got := of(rid); strings.Join(got, "|") != strings.Join(want, "|") {
			t.Errorf("log lines of the refused login: %q, want %q", got, want)
		}
		for _, l := range lines() {
			if l["request_id"] == rid && (l["cause"] != "unauthorized request: no grant" || l["sqlstate"] != broker.CodeInvalidAuthorization || l["process"] == nil) {
				t.Errorf("the refusal's line lacks its cause, SQLSTATE or the caller: %v", l)
			}
		}
	})

	t.Run("cancel", func(t *testing.T) {
		cancels := func() []string {
			var msgs []string
			for _, l := range lines() {
				if m := l["msg"].(string); strings.Contains(m, "cancel") {
					msgs = append(msgs, l["level"].(string)+" "+m)
				}
			}
			return msgs
		}
		c := h.connect(t, testenv.ScramUser, "orders")
		backend := testenv.BackendPID(t, c)
		go func() {
			if err := h.pg.CancelWhenRunning(c, backend, "select pg_sleep(20)"); err != nil {
				t.Errorf("cancel request: %v", err)
			}
		}()
		_, err := c.Exec(ctx, "select pg_sleep(20)")
		var pgErr *pgconn.PgError
		if !errors.As(err, &pgErr) || pgErr.Code != "57014" {
			t.Fatalf("pg_sleep: %v; want 57014", err)
		}
		time.Sleep(100 * time.Millisecond)
		if got, want := cancels(), []string{"INFO cancel request forwarded"}; strings.Join(got, "|") != strings.Join(want, "|") {
			t.Errorf("log lines of a forwarded cancel: %q, want %q", got, want)
		}
		// A forged key: one WARN line.
		if err := testenv.SendCancel("unix", h.agent.SocketPath(), c.PgConn().PID(), 12345); err != nil {
			t.Fatal(err)
		}
		eventually(t, "the forged cancel in the log", func() bool { return len(cancels()) >= 2 })
		time.Sleep(100 * time.Millisecond)
		if got, want := cancels(), []string{"INFO cancel request forwarded", "WARN cancel request rejected"}; strings.Join(got, "|") != strings.Join(want, "|") {
			t.Errorf("log lines of a forwarded and a forged cancel: %q, want %q", got, want)
		}
	})
}
