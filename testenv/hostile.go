package testenv

import (
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"
)

// RefusedStartup sends one StartupMessage for user and database (a role
// the caller holds no grant for) on a new connection to the Unix socket and
// reads the answer to its end. It reports whether the answer was an
// ErrorResponse.
func RefusedStartup(socket, user, database string) (bool, error) {
	c, err := net.DialTimeout("unix", socket, 5*time.Second)
	if err != nil {
		return false, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	buf, _ := (&pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersionNumber,
		Parameters: map[string]string{"user": user, "database": database}}).Encode(nil)
	if _, err := c.Write(buf); err != nil {
		return false, err
	}
	b, err := io.ReadAll(c)
	if err != nil {
		return false, err
	}
	return len(b) > 0 && b[0] == 'E', nil
}

// EnvSlotFlood makes a test binary a slot flooder (see SlotFlood) when set
// to "<socket> <n>".
const EnvSlotFlood = "PGWARD_SLOT_FLOOD"

// SlotFlood is the process a test runs as another uid (RunAs, StartChild)
// to flood pre-authentication slots: it opens n connections to the Unix
// socket, as spec "<socket> <n>" says, sends nothing on them, reports
// {"opened": count, "pid": its pid} and holds them until the parent lets
// it go. It does not return.
func SlotFlood(spec string) {
	f := strings.Fields(spec)
	if len(f) != 2 {
		fmt.Fprintf(os.Stderr, "%s=%q: want \"<socket> <n>\"\n", EnvSlotFlood, spec)
		os.Exit(2)
	}
	n, _ := strconv.Atoi(f[1])
	for range n {
		c, err := net.DialTimeout("unix", f[0], 5*time.Second)
		if err != nil {
			fmt.Fprintln(os.Stderr, "flood dial:", err)
			break
		}
		flooded = append(flooded, c)
	}
	Report(map[string]int{"opened": len(flooded), "pid": os.Getpid()})
}

// flooded holds SlotFlood's connections while Report waits: a net.Conn
// nothing refers to is closed by its finalizer at the next garbage
// collection, which gave the slots back to the pgward under test (the
// cause of TestLoginSlotsPerCgroup's rare 10-of-20 failure).
var flooded []net.Conn
