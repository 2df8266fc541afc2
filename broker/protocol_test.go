package broker

import (
	"context"
	"encoding/binary"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgward/pgward/testenv"
)

func rawDial(t *testing.T, h *harness) net.Conn {
	t.Helper()
	c, err := net.Dial("unix", h.socketPath())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	return c
}

func TestStartupNegotiation(t *testing.T) {
	h := newHarness(t, nil)
	c := rawDial(t, h)
	for _, code := range []uint32{80877103, 80877104} { // SSLRequest, GSSENCRequest
		if _, err := c.Write(binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(nil, 8), code)); err != nil {
			t.Fatal(err)
		}
		b := make([]byte, 1)
		if _, err := io.ReadFull(c, b); err != nil || b[0] != 'N' {
			t.Fatalf("encryption request %d answered %q %v", code, b, err)
		}
	}
	// A 3.2 client with a protocol option gets NegotiateProtocolVersion (3.0,
	// option unrecognized) and then a normal session.
	fe := pgproto3.NewFrontend(c, c)
	fe.Send(&pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersion32, Parameters: map[string]string{
		"user": testenv.ScramUser, "database": "orders", "_pq_.test_option": "1"}})
	if err := fe.Flush(); err != nil {
		t.Fatal(err)
	}
	m, err := fe.Receive()
	if err != nil {
		t.Fatal(err)
	}
	npv, ok := m.(*pgproto3.NegotiateProtocolVersion)
	if !ok || npv.NewestMinorProtocol != 0 || len(npv.UnrecognizedOptions) != 1 || npv.UnrecognizedOptions[0] != "_pq_.test_option" {
		t.Fatalf("got %#v", m)
	}
	var sawOK, sawKey bool
	for {
		m, err := fe.Receive()
		if err != nil {
			t.Fatal(err)
		}
		switch m := m.(type) {
		case *pgproto3.AuthenticationOk:
			sawOK = true
		case *pgproto3.BackendKeyData:
			sawKey = len(m.SecretKey) == 4
		case *pgproto3.ReadyForQuery:
			if !sawOK || !sawKey {
				t.Fatal("ReadyForQuery before AuthenticationOk and BackendKeyData")
			}
			return
		case *pgproto3.ErrorResponse:
			t.Fatalf("error: %s %s", m.Code, m.Message)
		}
	}
}

func TestMalformedStartupGetsErrorResponse(t *testing.T) {
	h := newHarness(t, nil)
	for _, tc := range []struct {
		name string
		pkt  []byte
	}{
		{"oversized", binary.BigEndian.AppendUint32(nil, 20000)},
		{"tiny length", binary.BigEndian.AppendUint32(nil, 3)},
		{"protocol 2", append(binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(nil, 14), 2<<16), 'u', 0, 'x', 0, 0, 0)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := rawDial(t, h)
			c.Write(tc.pkt)
			fe := pgproto3.NewFrontend(c, c)
			m, err := fe.Receive()
			if err != nil {
				t.Fatal(err)
			}
			e, ok := m.(*pgproto3.ErrorResponse)
			if !ok || e.Code != CodeProtocolViolation {
				t.Fatalf("got %#v", m)
			}
			if _, err := fe.Receive(); err == nil {
				t.Fatal("connection not closed after the error")
			}
		})
	}
	// Each is reported as a refusal for protocol reasons (the exporter
	// logs it at WARN).
	h.obs.mu.Lock()
	defer h.obs.mu.Unlock()
	n := 0
	for _, r := range h.obs.refused {
		if r.Failure == ReasonProtocol && r.Cause == "malformed startup packet" {
			n++
		}
	}
	if n != 3 {
		t.Fatalf("%d malformed startups reported as refused, want 3: %+v", n, h.obs.refused)
	}
}

func TestMaxConnections(t *testing.T) {
	h := newHarness(t, func(_ *harness, c *Config) { c.Listen.MaxConnections = 2 })
	h.connect(t, testenv.ScramUser, "orders")
	h.connect(t, testenv.ScramUser, "orders")
	e := connectErr(t, h.dsn(testenv.ScramUser, "orders"))
	if e.Code != CodeTooManyConnections || !strings.Contains(e.Message, "max_connections") {
		t.Fatalf("got %s %q", e.Code, e.Message)
	}
}

func TestLoginTimeout(t *testing.T) {
	// 2s: long enough for the legitimate login below (SCRAM against a real
	// server, plus the first use's role-membership query) on a loaded CI
	// machine under -race; 300ms failed there.
	h := newHarness(t, func(_ *harness, c *Config) { c.Listen.LoginTimeout = 2 * time.Second })
	c := rawDial(t, h)
	c.Write([]byte{0, 0}) // half a length, then nothing
	start := time.Now()
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Fatal("read succeeded")
	}
	if el := time.Since(start); el > 5*time.Second {
		t.Fatalf("closed after %v", el)
	}
	// A legitimate client still connects.
	h.connect(t, testenv.ScramUser, "orders")
}

func TestSocketLiveAndStale(t *testing.T) {
	h := newHarness(t, nil)
	// A second listener on the same socket refuses to start.
	if _, err := ListenUnix(ListenConfig{UnixDir: h.dir, Port: 5432}); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("second listener: %v", err)
	}
	// A stale socket file is replaced.
	dir := filepath.Join(h.dir, "stale")
	os.Mkdir(dir, 0o755)
	l, err := net.Listen("unix", filepath.Join(dir, ".s.PGSQL.5432"))
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	ln, err := ListenUnix(ListenConfig{UnixDir: dir, Port: 5432, Mode: "0600"})
	if err != nil {
		t.Fatalf("stale socket: %v", err)
	}
	defer ln.Close()
	fi, err := os.Stat(filepath.Join(dir, ".s.PGSQL.5432"))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v %v", fi.Mode(), err)
	}
	// A regular file is not removed.
	os.WriteFile(filepath.Join(dir, ".s.PGSQL.5433"), []byte("x"), 0o644)
	if _, err := ListenUnix(ListenConfig{UnixDir: dir, Port: 5433}); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("regular file: %v", err)
	}
	_ = context.Background
}
