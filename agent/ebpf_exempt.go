package agent

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/pgward/pgward/bpf"
)

// Exempt cgroups (ebpf.exempt). Two pgward agents guarding the same upstream
// (a blue/green pair, or a second agent for another socket) would report each
// other's upstream dials as db.connect.direct: each exempts only itself. The
// operator names the other agents' cgroups — cgroup v2 paths such as
// /system.slice/pgward-green.service, or systemd unit names, which mean
// /system.slice/<unit> — and connects from processes in exactly those
// cgroups are not direct connects. Never by process name or executable: a
// caller can name its binary anything, but it cannot enter a cgroup it has
// no write access to. The root cgroup (id 1, what most tasks report on
// hybrid hierarchies) is never exempt.
//
// The match is on the cgroup id in the kernel's connect record, so a
// process exempted is one that was in the cgroup when it connected. A path
// that does not exist yet (the other agent is not running), or that was
// made anew (a restarted unit), is looked up again, at most every
// exemptRetry, when a connect from an unknown cgroup is seen.
//
// Limit: the kernel programs exempt one cgroup (pgward's own) when
// enforcing, so ebpf.exempt is for reporting only and ebpf.enforce refuses
// it (config validation) until the programs carry an exempt map.

const exemptRetry = 5 * time.Second

type exemptCgroups struct {
	root  string   // cgroup2 mount
	paths []string // cgroup paths, relative to root, with a leading "/"

	mu       sync.Mutex
	ids      map[uint64]string // cgroup id → path
	missing  []string
	lastLook time.Time
}

// exemptPath turns an ebpf.exempt entry into a cgroup path.
func exemptPath(entry string) (string, error) {
	switch {
	case strings.HasPrefix(entry, "/"):
		p := filepath.Clean(entry)
		if p == "/" {
			return "", errors.New("the root cgroup cannot be exempt: most tasks report it")
		}
		return p, nil
	case strings.HasSuffix(entry, ".service") && !strings.Contains(entry, "/"):
		return "/system.slice/" + entry, nil
	}
	return "", fmt.Errorf("%q is neither a cgroup path (starting with /) nor a systemd service name", entry)
}

func newExemptCgroups(entries []string) (*exemptCgroups, error) {
	if len(entries) == 0 {
		return nil, nil
	}
	root, err := bpf.Cgroup2Root()
	if err != nil {
		return nil, fmt.Errorf("ebpf.exempt: %w", err)
	}
	e := &exemptCgroups{root: root, ids: map[uint64]string{}}
	for _, entry := range entries {
		p, err := exemptPath(entry)
		if err != nil {
			return nil, fmt.Errorf("ebpf.exempt: %w", err)
		}
		e.paths = append(e.paths, p)
	}
	e.missing = e.paths
	e.lookLocked(time.Now())
	return e, nil
}

// lookLocked resolves every path to its cgroup id again (a restarted
// unit's cgroup is a new directory with a new id).
func (e *exemptCgroups) lookLocked(now time.Time) {
	e.lastLook = now
	e.missing = e.missing[:0:0]
	clear(e.ids)
	for _, p := range e.paths {
		var st syscall.Stat_t
		if err := syscall.Stat(filepath.Join(e.root, p), &st); err != nil || st.Mode&syscall.S_IFMT != syscall.S_IFDIR || st.Ino <= 1 {
			e.missing = append(e.missing, p)
			continue
		}
		e.ids[st.Ino] = p
	}
}

// exempt says whether a connect from cgroup id is exempt, and the path.
func (e *exemptCgroups) exempt(id uint64) (string, bool) {
	if e == nil || id <= 1 {
		return "", false
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if p, ok := e.ids[id]; ok {
		return p, true
	}
	if time.Since(e.lastLook) >= exemptRetry {
		e.lookLocked(time.Now())
		if p, ok := e.ids[id]; ok {
			return p, true
		}
	}
	return "", false
}
