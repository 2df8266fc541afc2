package bpf

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Cgroup2Root returns the cgroup v2 mount point: /sys/fs/cgroup/unified on
// hybrid v1/v2 hosts, usually /sys/fs/cgroup elsewhere.
func Cgroup2Root() (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", fmt.Errorf("find cgroup2 mount: %w", err)
	}
	defer f.Close()

	var found []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if mp, fstype, ok := parseMountinfo(sc.Text()); ok && fstype == "cgroup2" {
			found = append(found, mp)
		}
	}
	if err := sc.Err(); err != nil {
		return "", fmt.Errorf("find cgroup2 mount: %w", err)
	}
	for _, want := range []string{"/sys/fs/cgroup/unified", "/sys/fs/cgroup"} {
		for _, mp := range found {
			if mp == want {
				return mp, nil
			}
		}
	}
	if len(found) > 0 {
		return found[0], nil
	}
	return "", errors.New("no cgroup2 file system mounted")
}

// parseMountinfo returns the mount point and file system type of a line of
// /proc/self/mountinfo.
func parseMountinfo(line string) (mountPoint, fstype string, ok bool) {
	pre, post, ok := strings.Cut(line, " - ")
	if !ok {
		return "", "", false
	}
	fields, postFields := strings.Fields(pre), strings.Fields(post)
	if len(fields) < 5 || len(postFields) < 1 {
		return "", "", false
	}
	return unescapeMountinfo(fields[4]), postFields[0], true
}

// unescapeMountinfo undoes the octal escapes (\040 for space) of mountinfo.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// ensureTracefs mounts tracefs at /sys/kernel/tracing unless a tracefs is
// mounted there or at /sys/kernel/debug/tracing: tracepoint links need it to
// look up event ids. It must run before the first link.Tracepoint, which
// remembers the tracefs location for the life of the process.
func ensureTracefs() error {
	for _, p := range []string{"/sys/kernel/tracing", "/sys/kernel/debug/tracing"} {
		var st unix.Statfs_t
		if unix.Statfs(p, &st) == nil && st.Type == unix.TRACEFS_MAGIC {
			return nil
		}
	}
	if err := unix.Mount("nodev", "/sys/kernel/tracing", "tracefs", 0, ""); err != nil {
		return classify(fmt.Errorf("mount tracefs on /sys/kernel/tracing: %w", err))
	}
	return nil
}
