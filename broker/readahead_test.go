package broker

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgward/pgward/testenv"
	"github.com/pgward/pgward/testenv/faultpg"
)

// Bytes a server sends right behind a ReadyForQuery arrive with it in one
// read. Whatever pgward reads them with (the upstream login, its own
// statements on a reuse connection) must hand them to the client, in order:
// none may be left behind in a buffer.

func encodeMsgs(t *testing.T, msgs ...pgproto3.BackendMessage) []byte {
	t.Helper()
	var b []byte
	for _, m := range msgs {
		var err error
		if b, err = m.Encode(b); err != nil {
			t.Fatal(err)
		}
	}
	return b
}

// loginBehind is a faultpg script: a login whose last write carries behind
// after ReadyForQuery, then every simple Query is answered with answer(q)
// (CommandComplete and ReadyForQuery when nil). With closeOnNext the server
// reads the next message after the login and closes, as a backend
// terminated right after its login does.
func loginBehind(behind []byte, closeOnNext bool, answer func(q string) []byte) faultpg.Script {
	var pids atomic.Uint32
	return func(s *faultpg.Server, c net.Conn) error {
		if err := faultpg.PasswordLogin(c, 4000+pids.Add(1), behind); err != nil {
			return err
		}
		for {
			typ, body, err := faultpg.ReadMessage(c)
			if err != nil || closeOnNext || typ == 'X' {
				return err
			}
			if typ != 'Q' {
				return fmt.Errorf("fake upstream: unexpected message %q", typ)
			}
			var out []byte
			if answer != nil {
				out = answer(strings.TrimSuffix(string(body), "\x00"))
			}
			if out == nil {
				out = append(faultpg.Message('C', []byte("SELECT 0\x00")), faultpg.Message('Z', []byte{'I'})...)
			}
			if _, err := c.Write(out); err != nil {
				return err
			}
		}
	}
}

// onFake points upstream "trap" at fake, with cleartext password login
// (any password passes) and reuse as given.
func onFake(fake *faultpg.Server, reuse *ReuseConfig) func(*harness, *Config) {
	return func(h *harness, c *Config) {
		c.Upstreams["trap"] = UpstreamConfig{Address: fake.Addr(), TLS: TLSConfig{Mode: "disable"}, Auth: []string{"password"}, Reuse: reuse}
	}
}

// listener collects what a pgx connection is told besides results.
type listener struct {
	notices, notifications chan string
}

func connectListening(t *testing.T, dsn string) (*pgx.Conn, *listener) {
	t.Helper()
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		t.Fatal(err)
	}
	l := &listener{notices: make(chan string, 8), notifications: make(chan string, 8)}
	cfg.OnNotice = func(_ *pgconn.PgConn, n *pgconn.Notice) { l.notices <- n.Code + " " + n.Message }
	cfg.OnNotification = func(_ *pgconn.PgConn, n *pgconn.Notification) { l.notifications <- n.Channel + " " + n.Payload }
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	c, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		t.Fatalf("connect through pgward: %v", err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c, l
}

func (l *listener) want(t *testing.T, what string, c chan string, v string) {
	t.Helper()
	select {
	case got := <-c:
		if got != v {
			t.Fatalf("%s: got %q, want %q", what, got, v)
		}
	default:
		t.Fatalf("the client never got the %s %q", what, v)
	}
}

// A NoticeResponse, a ParameterStatus and a NotificationResponse the server
// sends in the same write as the login's ReadyForQuery reach the client,
// with and without connection reuse (where pgward runs set_config for the
// client's startup parameters before the relay starts).
func TestUpstreamMessagesBehindLoginReachClient(t *testing.T) {
	behind := encodeMsgs(t,
		&pgproto3.NoticeResponse{Severity: "NOTICE", SeverityUnlocalized: "NOTICE", Code: "01000", Message: "said right after the login"},
		&pgproto3.ParameterStatus{Name: "application_name", Value: "set-after-login"},
		&pgproto3.NotificationResponse{PID: 4242, Channel: "chan", Payload: "sent right after the login"},
	)
	for _, tc := range []struct {
		name  string
		reuse *ReuseConfig
		extra []string
	}{
		{"fresh", nil, nil},
		{"reuse", &ReuseConfig{}, nil},
		{"reuse with startup parameters", &ReuseConfig{}, []string{"timezone=UTC"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fake := faultpg.Start(t, loginBehind(behind, false, nil))
			h := newHarness(t, onFake(fake, tc.reuse))
			c, l := connectListening(t, h.dsn(testenv.ScramUser, "trap", tc.extra...))
			if _, err := c.Exec(context.Background(), "select 1"); err != nil {
				t.Fatalf("statement after the login: %v", err)
			}
			l.want(t, "notice", l.notices, "01000 said right after the login")
			l.want(t, "notification", l.notifications, "chan sent right after the login")
			if got := c.PgConn().ParameterStatus("application_name"); got != "set-after-login" {
				t.Fatalf("application_name: got %q, want the server's set-after-login", got)
			}
			if errs := fake.Errs(); len(errs) > 0 {
				t.Fatalf("fake upstream: %v", errs)
			}
		})
	}
}

// A backend terminated right after its login (57P01 in the same write as
// ReadyForQuery, then the connection closes): the client gets the server's
// FATAL, not pgward's 08006 "lost the connection".
func TestUpstreamFatalBehindLoginReachesClient(t *testing.T) {
	behind := encodeMsgs(t, &pgproto3.ErrorResponse{Severity: "FATAL", SeverityUnlocalized: "FATAL",
		Code: "57P01", Message: "terminating connection due to administrator command"})
	fake := faultpg.Start(t, loginBehind(behind, true, nil))
	h := newHarness(t, onFake(fake, nil))
	c, _ := connectListening(t, h.dsn(testenv.ScramUser, "trap"))
	_, err := c.Exec(context.Background(), "select 1")
	if code := testenv.PgCode(err); code != "57P01" {
		t.Fatalf("statement on a terminated backend: %v; want the server's 57P01", err)
	}
	waitNoSessions(t, h)
}

// Reuse hand-over: when pgward takes a parked connection it sets the new
// client's parameters with a statement of its own and reads exactly its
// answer, so a notice the server sends in the same write, behind that
// answer's ReadyForQuery, reaches the new client.
func TestReuseHandOverKeepsBytesBehindOwnStatement(t *testing.T) {
	notice := encodeMsgs(t, &pgproto3.NoticeResponse{Severity: "NOTICE", SeverityUnlocalized: "NOTICE", Code: "01000", Message: "behind pgward's statement"})
	var setConfigs atomic.Int32
	fake := faultpg.Start(t, loginBehind(nil, false, func(q string) []byte {
		if !strings.Contains(q, "set_config") || setConfigs.Add(1) != 2 {
			return nil
		}
		// The second set_config is the hand-over to the second session.
		b := append(faultpg.Message('C', []byte("SELECT 1\x00")), faultpg.Message('Z', []byte{'I'})...)
		return append(b, notice...)
	}))
	h := newHarness(t, onFake(fake, &ReuseConfig{}))
	ctx := context.Background()
	dsn := h.dsn(testenv.ScramUser, "trap", "application_name=handover")

	first, _ := connectListening(t, dsn)
	if _, err := first.Exec(ctx, "select 1"); err != nil {
		t.Fatal(err)
	}
	first.Close(ctx)
	deadline := time.Now().Add(5 * time.Second)
	for h.srv.reuse.idle() != 1 {
		if time.Now().After(deadline) {
			t.Fatal("the first session's upstream connection was not parked")
		}
		time.Sleep(10 * time.Millisecond)
	}

	second, l := connectListening(t, dsn)
	if _, err := second.Exec(ctx, "select 1"); err != nil {
		t.Fatal(err)
	}
	if fake.Accepted() != 1 {
		t.Fatalf("the fake upstream was dialled %d times; want 1 (the connection reused)", fake.Accepted())
	}
	l.want(t, "notice", l.notices, "01000 behind pgward's statement")
}

// A client may pipeline its first Query right behind its StartupMessage, in
// one write: pgward reads the startup packet exactly, so the Query is
// relayed once the session starts.
func TestClientQueryPipelinedBehindStartup(t *testing.T) {
	h := newHarness(t, nil)
	conn, err := net.Dial("unix", filepath.Join(h.dir, ".s.PGSQL.5432"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(15 * time.Second))
	var b []byte
	b, _ = (&pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersionNumber,
		Parameters: map[string]string{"user": testenv.ScramUser, "database": "orders"}}).Encode(b)
	b, _ = (&pgproto3.Query{String: "select 40 + 2"}).Encode(b)
	if _, err := conn.Write(b); err != nil {
		t.Fatal(err)
	}
	fe := pgproto3.NewFrontend(conn, conn)
	readies, row := 0, ""
	for readies < 2 {
		m, err := fe.Receive()
		if err != nil {
			t.Fatalf("after %d ReadyForQuery: %v", readies, err)
		}
		switch m := m.(type) {
		case *pgproto3.ReadyForQuery:
			readies++
		case *pgproto3.DataRow:
			row = string(m.Values[0])
		case *pgproto3.ErrorResponse:
			t.Fatalf("server error: %s %s", m.Code, m.Message)
		}
	}
	if row != "42" {
		t.Fatalf("pipelined query: got row %q, want 42", row)
	}
}

// Issue 8: a login whose last write is slow must leave no other reader on
// the upstream connection. Here the password is 12 MiB and the fake server
// answers the login (AuthenticationOk … ReadyForQuery) before it reads it,
// as a loaded machine may deschedule the login right after its write.
// pgward once logged in with pgconn.Connect and Hijack: the slow write
// started pgconn's background reader, which read the login's answer, was
// left blocked in a second Read on the hijacked conn, and took the answer
// to the client's first statement — the session hung, both relay
// goroutines parked reading.
func TestSlowLoginWriteLeavesNoReaderBehind(t *testing.T) {
	password := strings.Repeat("p", 12<<20) // more than the sockets buffer: the write blocks
	fake := faultpg.Start(t, func(s *faultpg.Server, c net.Conn) error {
		if _, _, err := faultpg.ReadPacket(c); err != nil {
			return err
		}
		if _, err := c.Write(faultpg.Message('R', []byte{0, 0, 0, 3})); err != nil {
			return err
		}
		// The client is now stuck writing its password: answer first.
		time.Sleep(100 * time.Millisecond)
		if _, err := c.Write(faultpg.AuthOKReady()); err != nil {
			return err
		}
		time.Sleep(100 * time.Millisecond)
		var hdr [5]byte
		if _, err := io.ReadFull(c, hdr[:]); err != nil {
			return err
		}
		if hdr[0] != 'p' {
			return fmt.Errorf("fake upstream: expected a PasswordMessage, got %q", hdr[0])
		}
		if _, err := io.CopyN(io.Discard, c, int64(binary.BigEndian.Uint32(hdr[1:]))-4); err != nil {
			return err
		}
		for {
			typ, _, err := faultpg.ReadMessage(c)
			if err != nil || typ == 'X' {
				return err
			}
			out := append(faultpg.Message('C', []byte("SELECT 0\x00")), faultpg.Message('Z', []byte{'I'})...)
			if _, err := c.Write(out); err != nil {
				return err
			}
		}
	})
	h := newHarness(t, func(h *harness, c *Config) {
		onFake(fake, nil)(h, c)
		h.secrets["trap"] = map[string]string{testenv.ScramUser: password}
	})
	c, _ := connectListening(t, h.dsn(testenv.ScramUser, "trap"))
	for i := range 3 {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := c.Exec(ctx, "select 1")
		cancel()
		if err != nil {
			t.Fatalf("statement %d after a slow login: %v (the answer went to another reader)", i, err)
		}
	}
}

// An upstream that answers the login after listen.login_timeout: the
// client gets pgward's 08001, not its connection closed without a word.
// (The upstream login was bounded by connect_timeout alone; the session
// started, and its greeting, written under the client's login deadline,
// which had passed, failed: the client saw EOF.)
func TestSlowUpstreamLoginRefusedAtLoginTimeout(t *testing.T) {
	fake := faultpg.Start(t, func(s *faultpg.Server, c net.Conn) error {
		time.Sleep(1500 * time.Millisecond)
		return loginBehind(nil, false, nil)(s, c)
	})
	h := newHarness(t, func(h *harness, c *Config) {
		onFake(fake, nil)(h, c)
		c.Listen.LoginTimeout = time.Second
	})
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, h.dsn(testenv.ScramUser, "trap"))
	if err == nil {
		c.Close(ctx)
		t.Fatal("logged in through an upstream slower than login_timeout")
	}
	if code := testenv.PgCode(err); code != CodeCannotConnect {
		t.Fatalf("login through an upstream slower than login_timeout: %v; want pgward's 08001", err)
	}
	waitNoSessions(t, h)
}
