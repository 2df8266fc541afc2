package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Notifier speaks systemd's notification protocol (sd_notify(3)): one
// datagram per state change to the Unix socket named by NOTIFY_SOCKET. It
// is what makes Type=notify units work: READY=1 once the listeners are up,
// STOPPING=1 when draining starts, RELOADING=1/READY=1 around a reload and
// WATCHDOG=1 keep-alives when WatchdogSec= is set.
//
// A nil *Notifier does nothing, so the agent calls it unconditionally.
type Notifier struct {
	addr     *net.UnixAddr
	watchdog time.Duration // keep-alive interval (half of WATCHDOG_USEC); 0 = off

	mu   sync.Mutex
	conn *net.UnixConn
}

// ErrNotifySocket is returned for a NOTIFY_SOCKET pgward cannot use.
var ErrNotifySocket = errors.New("unsupported NOTIFY_SOCKET")

// NotifierFromEnv builds a Notifier from NOTIFY_SOCKET, WATCHDOG_USEC and
// WATCHDOG_PID, as systemd sets them for the main process of a unit. It
// returns nil, nil when NOTIFY_SOCKET is unset (not run by systemd, or not a
// Type=notify unit). pid is the caller's process id, compared with
// WATCHDOG_PID: the watchdog is meant for that process only.
//
// NOTIFY_SOCKET is a path ("/run/systemd/notify") or an abstract socket name
// written with a leading '@'. vsock addresses (systemd in VMs) are refused.
func NotifierFromEnv(getenv func(string) string, pid int) (*Notifier, error) {
	name := getenv("NOTIFY_SOCKET")
	if name == "" {
		return nil, nil
	}
	if !strings.HasPrefix(name, "/") && !strings.HasPrefix(name, "@") {
		return nil, fmt.Errorf("%w %q: only socket paths and @abstract names are supported", ErrNotifySocket, name)
	}
	n := &Notifier{addr: &net.UnixAddr{Name: name, Net: "unixgram"}}
	if usec := getenv("WATCHDOG_USEC"); usec != "" {
		v, err := strconv.ParseUint(usec, 10, 63)
		if err != nil || v == 0 {
			return nil, fmt.Errorf("WATCHDOG_USEC=%q is not a positive number of microseconds", usec)
		}
		wpid := getenv("WATCHDOG_PID")
		if wpid == "" || wpid == strconv.Itoa(pid) {
			n.watchdog = time.Duration(v) * time.Microsecond / 2
		}
	}
	return n, nil
}

// WatchdogInterval is how often Run sends WATCHDOG=1 (half of
// WATCHDOG_USEC, as sd_watchdog_enabled(3) advises), or 0 when systemd
// expects no keep-alives.
func (n *Notifier) WatchdogInterval() time.Duration {
	if n == nil {
		return 0
	}
	return n.watchdog
}

// Notify sends state, one or more "KEY=value" lines ("READY=1",
// "STATUS=draining"). A nil Notifier does nothing.
func (n *Notifier) Notify(state ...string) error {
	if n == nil || len(state) == 0 {
		return nil
	}
	msg := []byte(strings.Join(state, "\n"))
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.conn == nil {
		// The abstract-name form needs no special handling: Go maps a
		// leading '@' to the NUL byte of Linux's abstract namespace.
		c, err := net.DialUnix("unixgram", nil, n.addr)
		if err != nil {
			return fmt.Errorf("sd_notify %s: %w", n.addr.Name, err)
		}
		n.conn = c
	}
	if _, err := n.conn.Write(msg); err != nil {
		// systemd may have been re-executed: dial again once.
		n.conn.Close()
		n.conn = nil
		c, derr := net.DialUnix("unixgram", nil, n.addr)
		if derr != nil {
			return fmt.Errorf("sd_notify %s: %w", n.addr.Name, err)
		}
		n.conn = c
		if _, err := c.Write(msg); err != nil {
			return fmt.Errorf("sd_notify %s: %w", n.addr.Name, err)
		}
	}
	return nil
}

// runWatchdog sends WATCHDOG=1 every interval until ctx ends.
func (n *Notifier) runWatchdog(ctx context.Context, onErr func(error)) {
	iv := n.WatchdogInterval()
	if iv <= 0 {
		return
	}
	t := time.NewTicker(iv)
	defer t.Stop()
	for {
		if err := n.Notify("WATCHDOG=1"); err != nil && onErr != nil {
			onErr(err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// Close releases the socket. It is idempotent.
func (n *Notifier) Close() error {
	if n == nil {
		return nil
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.conn != nil {
		err := n.conn.Close()
		n.conn = nil
		return err
	}
	return nil
}
