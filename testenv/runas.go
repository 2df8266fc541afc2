package testenv

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
)

// ServerUserName is the system account the test Postgres runs as when the
// tests run as root (Postgres refuses to run as root). StartPostgres creates
// it with useradd when it is missing, and falls back to "nobody" when it
// cannot.
const ServerUserName = "pgward-pg"

// firstUnprivilegedID is where UnprivilegedIDs starts counting.
const firstUnprivilegedID = 61001

// RunAs returns a command that runs name as uid:gid with no supplementary
// groups and HOME=/ (the rest of the environment is inherited; set cmd.Env
// after this call to change it). When uid and gid are the current process's
// own, no credential switch is requested, so non-root callers can use it for
// themselves.
func RunAs(uid, gid uint32, name string, args ...string) *exec.Cmd {
	cmd := exec.Command(name, args...)
	cmd.Env = append(withoutEnv(os.Environ(), "HOME"), "HOME=/")
	cmd.Dir = "/"
	if uid != uint32(os.Geteuid()) || gid != uint32(os.Getegid()) || os.Geteuid() == 0 {
		cmd.SysProcAttr = &syscall.SysProcAttr{
			Credential: &syscall.Credential{Uid: uid, Gid: gid, Groups: []uint32{}},
		}
	}
	return cmd
}

// RequireRoot skips the test unless it runs as root, and fails it under
// CI=true (see SkipUnlessCI): CI runs as root, so these tests never skip
// there.
func RequireRoot(tb testing.TB) {
	tb.Helper()
	if os.Geteuid() != 0 {
		SkipUnlessCI(tb, "needs root: runs processes as other uids (euid is %d); run `sudo go test` or in CI", os.Geteuid())
	}
}

// UnprivilegedIDs returns n distinct uids, counting up from 61001, that are
// neither root, nor the test Postgres server's account, nor in the passwd
// database. Use each as both uid and gid with RunAs; they need no passwd
// entry. It does not skip: pair it with RequireRoot when the ids are used to
// run processes.
func UnprivilegedIDs(tb testing.TB, n int) []uint32 {
	tb.Helper()
	skip := map[uint32]bool{0: true}
	if su, err := serverUser(); err == nil {
		skip[su.uid] = true
	}
	ids := make([]uint32, 0, n)
	for id := uint32(firstUnprivilegedID); len(ids) < n; id++ {
		if id > firstUnprivilegedID+100000 {
			tb.Fatalf("UnprivilegedIDs: no %d free uids above %d", n, firstUnprivilegedID)
		}
		if skip[id] {
			continue
		}
		if _, err := user.LookupId(strconv.FormatUint(uint64(id), 10)); err == nil {
			continue
		}
		ids = append(ids, id)
	}
	return ids
}

// osUser is the account the Postgres server processes run as.
type osUser struct {
	name     string
	uid, gid uint32
	// switchTo is true when processes must be started with these
	// credentials (we are root); false when they run as ourselves.
	switchTo bool
}

func (u osUser) sysProcAttr() *syscall.SysProcAttr {
	a := &syscall.SysProcAttr{}
	if u.switchTo {
		a.Credential = &syscall.Credential{Uid: u.uid, Gid: u.gid, Groups: []uint32{}}
	}
	return a
}

// chown gives path to the server account when we are root; otherwise a no-op.
func (u osUser) chown(path string) error {
	if !u.switchTo {
		return nil
	}
	return os.Lchown(path, int(u.uid), int(u.gid))
}

var (
	serverUserOnce sync.Once
	serverUserVal  osUser
	serverUserErr  error
)

// serverUser returns the account Postgres runs as: ourselves when not root,
// otherwise ServerUserName (created if missing) or, failing that, nobody.
func serverUser() (osUser, error) {
	serverUserOnce.Do(func() { serverUserVal, serverUserErr = findServerUser() })
	return serverUserVal, serverUserErr
}

func findServerUser() (osUser, error) {
	if os.Geteuid() != 0 {
		name := strconv.Itoa(os.Geteuid())
		if u, err := user.Current(); err == nil {
			name = u.Username
		}
		return osUser{name: name, uid: uint32(os.Geteuid()), gid: uint32(os.Getegid())}, nil
	}
	u, err := user.Lookup(ServerUserName)
	if err != nil {
		// Several test binaries may race here; useradd locks /etc/passwd and
		// the loser fails with "already exists", so look up again either way.
		out, uerr := exec.Command("useradd", "--system", "--user-group", "--no-create-home",
			"--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin",
			"--comment", "pgward test Postgres", ServerUserName).CombinedOutput()
		u, err = user.Lookup(ServerUserName)
		if err != nil {
			u, err = user.Lookup("nobody")
			if err != nil {
				return osUser{}, fmt.Errorf("no account for the Postgres server: useradd %s: %w: %s; and no nobody",
					ServerUserName, errors.Join(uerr, err), strings.TrimSpace(string(out)))
			}
		}
	}
	uid, err := strconv.ParseUint(u.Uid, 10, 32)
	if err != nil {
		return osUser{}, fmt.Errorf("parse uid of %s: %w", u.Username, err)
	}
	gid, err := strconv.ParseUint(u.Gid, 10, 32)
	if err != nil {
		return osUser{}, fmt.Errorf("parse gid of %s: %w", u.Username, err)
	}
	if uid == 0 {
		return osUser{}, fmt.Errorf("account %s has uid 0; Postgres will not run as root", u.Username)
	}
	return osUser{name: u.Username, uid: uint32(uid), gid: uint32(gid), switchTo: true}, nil
}

func withoutEnv(env []string, keys ...string) []string {
	out := env[:0:0]
next:
	for _, kv := range env {
		for _, k := range keys {
			if strings.HasPrefix(kv, k+"=") {
				continue next
			}
		}
		out = append(out, kv)
	}
	return out
}
