package agent

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// notifyListener is what systemd holds: a datagram socket collecting
// notifications.
type notifyListener struct {
	conn *net.UnixConn
	msgs chan string
}

func listenNotify(t *testing.T, name string) *notifyListener {
	t.Helper()
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	l := &notifyListener{conn: c, msgs: make(chan string, 1024)}
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := c.Read(buf)
			if err != nil {
				close(l.msgs)
				return
			}
			l.msgs <- string(buf[:n])
		}
	}()
	t.Cleanup(func() { c.Close() })
	return l
}

// expect waits for a datagram containing line, skipping others; it returns
// what it skipped.
func (l *notifyListener) expect(t *testing.T, line string, within time.Duration) []string {
	t.Helper()
	var seen []string
	deadline := time.After(within)
	for {
		select {
		case m, ok := <-l.msgs:
			if !ok {
				t.Fatalf("notify socket closed; saw %q before %q", seen, line)
			}
			for _, ln := range strings.Split(m, "\n") {
				if ln == line {
					return seen
				}
			}
			seen = append(seen, m)
		case <-deadline:
			t.Fatalf("no %q within %v; saw %q", line, within, seen)
		}
	}
}

func TestNotifierFromEnv(t *testing.T) {
	env := func(kv ...string) func(string) string {
		m := map[string]string{}
		for i := 0; i+1 < len(kv); i += 2 {
			m[kv[i]] = kv[i+1]
		}
		return func(k string) string { return m[k] }
	}
	tests := []struct {
		name     string
		getenv   func(string) string
		nilN     bool
		watchdog time.Duration
		err      string
	}{
		{"not under systemd", env(), true, 0, ""},
		{"path", env("NOTIFY_SOCKET", "/run/systemd/notify"), false, 0, ""},
		{"abstract", env("NOTIFY_SOCKET", "@/org/freedesktop/systemd1/notify/123"), false, 0, ""},
		{"watchdog for us", env("NOTIFY_SOCKET", "/x", "WATCHDOG_USEC", "20000000", "WATCHDOG_PID", "42"), false, 10 * time.Second, ""},
		{"watchdog without pid", env("NOTIFY_SOCKET", "/x", "WATCHDOG_USEC", "3000000"), false, 1500 * time.Millisecond, ""},
		{"watchdog for another process", env("NOTIFY_SOCKET", "/x", "WATCHDOG_USEC", "20000000", "WATCHDOG_PID", "43"), false, 0, ""},
		{"bad watchdog", env("NOTIFY_SOCKET", "/x", "WATCHDOG_USEC", "soon"), true, 0, "WATCHDOG_USEC"},
		{"vsock", env("NOTIFY_SOCKET", "vsock:2:1234"), true, 0, "unsupported NOTIFY_SOCKET"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n, err := NotifierFromEnv(tt.getenv, 42)
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("err %v, want %q", err, tt.err)
				}
			} else if err != nil {
				t.Fatal(err)
			}
			if (n == nil) != tt.nilN {
				t.Fatalf("notifier %v, want nil=%v", n, tt.nilN)
			}
			if got := n.WatchdogInterval(); got != tt.watchdog {
				t.Fatalf("watchdog %v, want %v", got, tt.watchdog)
			}
		})
	}
	var vs error
	_, vs = NotifierFromEnv(env("NOTIFY_SOCKET", "vsock:2:1"), 1)
	if !errors.Is(vs, ErrNotifySocket) {
		t.Fatalf("vsock error %v is not ErrNotifySocket", vs)
	}
	// A nil notifier is a no-op.
	var n *Notifier
	if err := n.Notify("READY=1"); err != nil || n.Close() != nil {
		t.Fatal("nil notifier did something")
	}
}

func TestNotifySocketKinds(t *testing.T) {
	dir := t.TempDir()
	for _, name := range []string{filepath.Join(dir, "notify"), fmt.Sprintf("@pgward-notify-test-%d", os.Getpid())} {
		t.Run(name, func(t *testing.T) {
			l := listenNotify(t, name)
			n, err := NotifierFromEnv(func(k string) string {
				return map[string]string{"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "100000"}[k]
			}, os.Getpid())
			if err != nil {
				t.Fatal(err)
			}
			defer n.Close()
			if err := n.Notify("READY=1", "STATUS=serving"); err != nil {
				t.Fatal(err)
			}
			select {
			case m := <-l.msgs:
				if m != "READY=1\nSTATUS=serving" {
					t.Fatalf("datagram %q", m)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("no datagram")
			}
		})
	}
	// No listener: an error, not a hang or a panic.
	n, _ := NotifierFromEnv(func(k string) string {
		if k == "NOTIFY_SOCKET" {
			return filepath.Join(dir, "nobody")
		}
		return ""
	}, 1)
	if err := n.Notify("READY=1"); err == nil {
		t.Fatal("notify to a missing socket succeeded")
	}
}
