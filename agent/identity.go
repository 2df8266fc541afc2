package agent

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/pgward/pgward/broker"
)

// Errors of identity verification. They go to the log, never to the client.
var (
	ErrNoPeerCredentials = errors.New("peer credentials unavailable")
	ErrProcessGone       = errors.New("calling process exited before it could be identified")
	ErrNotAttested       = errors.New("no eBPF connect record matches this connection")
)

// Attester adds the kernel's connect record to an identity. The eBPF
// tracker implements it. Attest returns ok=false when no record matches.
type Attester interface {
	AttestUnix(ctx context.Context, conn *net.UnixConn, id *broker.Identity) (bool, error)
	AttestTCP(ctx context.Context, conn *net.TCPConn) (broker.Identity, bool, error)
}

// Resolver is the agent's broker.IdentityResolver: SO_PEERCRED for who,
// SO_PEERPIDFD to pin the process while /proc is read, and the eBPF connect
// record when a tracker is running.
type Resolver struct {
	ProcRoot    string   // default /proc
	Attester    Attester // nil: peer credentials only
	RequireEBPF bool     // refuse connections without a matching eBPF record
	// Pods maps a container id to its Kubernetes pod; nil: no pod identity.
	Pods PodLookup

	users sync.Map // uid → name
}

// Resolve implements broker.IdentityResolver.
func (r *Resolver) Resolve(ctx context.Context, conn net.Conn) (broker.Identity, error) {
	switch c := conn.(type) {
	case *net.UnixConn:
		return r.resolveUnix(ctx, c)
	case *net.TCPConn:
		if r.Attester == nil {
			return broker.Identity{}, fmt.Errorf("tcp listener: %w (eBPF is not running)", ErrNotAttested)
		}
		id, ok, err := r.Attester.AttestTCP(ctx, c)
		if err != nil {
			return broker.Identity{}, err
		}
		if !ok {
			return broker.Identity{}, fmt.Errorf("tcp connection from %s: %w", c.RemoteAddr(), ErrNotAttested)
		}
		id.User = r.userName(id.UID)
		r.fillFromProc(&id, -1)
		return id, nil
	}
	return broker.Identity{}, fmt.Errorf("%w: %T is not a Unix or TCP connection", ErrNoPeerCredentials, conn)
}

func (r *Resolver) resolveUnix(ctx context.Context, c *net.UnixConn) (broker.Identity, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return broker.Identity{}, fmt.Errorf("%w: %w", ErrNoPeerCredentials, err)
	}
	var cred *unix.Ucred
	pidfd := -1
	var credErr error
	err = raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
		if credErr != nil {
			return
		}
		// Linux ≥ 6.5: a pidfd for the process that called connect().
		if v, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PEERPIDFD); err == nil {
			pidfd = v
		}
	})
	if err == nil {
		err = credErr
	}
	if err != nil {
		return broker.Identity{}, fmt.Errorf("%w: %w", ErrNoPeerCredentials, err)
	}
	if cred.Pid <= 0 {
		return broker.Identity{}, fmt.Errorf("%w: the peer is in another pid namespace", ErrNoPeerCredentials)
	}
	if pidfd >= 0 {
		defer unix.Close(pidfd)
	}
	id := broker.Identity{PID: cred.Pid, UID: cred.Uid, GID: cred.Gid}
	id.User = r.userName(id.UID)

	if r.Attester != nil {
		ok, err := r.Attester.AttestUnix(ctx, c, &id)
		if err != nil {
			return broker.Identity{}, err
		}
		if !ok && r.RequireEBPF {
			return broker.Identity{}, fmt.Errorf("pid %d uid %d: %w", id.PID, id.UID, ErrNotAttested)
		}
	} else if r.RequireEBPF {
		return broker.Identity{}, fmt.Errorf("pid %d uid %d: %w (eBPF is not running)", id.PID, id.UID, ErrNotAttested)
	}

	if !r.fillFromProc(&id, pidfd) {
		return broker.Identity{}, fmt.Errorf("pid %d: %w", id.PID, ErrProcessGone)
	}
	return id, nil
}

// fillFromProc reads exe, comm and cgroup of id.PID. With a pidfd, the
// process is checked alive before and after the reads, so what was read
// belongs to it and not to a process that reused its pid. It returns false
// when the process is gone.
func (r *Resolver) fillFromProc(id *broker.Identity, pidfd int) bool {
	alive := func() bool {
		if pidfd < 0 {
			return true
		}
		// Signal 0 checks existence: ESRCH once the process has exited.
		// EPERM (a process of another uid, and no CAP_KILL) means it lives.
		err := unix.PidfdSendSignal(pidfd, 0, nil, 0)
		return err == nil || errors.Is(err, unix.EPERM)
	}
	if !alive() {
		return false
	}
	root := r.ProcRoot
	if root == "" {
		root = "/proc"
	}
	dir := filepath.Join(root, strconv.Itoa(int(id.PID)))
	exe, err := os.Readlink(filepath.Join(dir, "exe"))
	if err == nil {
		id.Exe = strings.TrimSuffix(exe, " (deleted)")
	}
	if id.Comm == "" {
		if b, err := os.ReadFile(filepath.Join(dir, "comm")); err == nil {
			id.Comm = strings.TrimSuffix(string(b), "\n")
		}
	}
	if b, err := os.ReadFile(filepath.Join(dir, "cgroup")); err == nil {
		id.Cgroup = CgroupPath(b)
		id.SystemdUnit = SystemdUnit(id.Cgroup)
		id.ContainerID = ContainerID(id.Cgroup)
	}
	if r.Pods != nil && id.ContainerID != "" {
		if pod, ok := r.Pods.PodFor(id.ContainerID); ok {
			id.Pod = pod
		}
	}
	if pidfd >= 0 {
		if !alive() {
			return false
		}
		id.Pinned = true
	} else if exe == "" && err != nil {
		// Without a pidfd, a process whose /proc entry is gone has exited.
		if _, statErr := os.Stat(dir); statErr != nil {
			return false
		}
	}
	return true
}

func (r *Resolver) userName(uid uint32) string {
	if v, ok := r.users.Load(uid); ok {
		return v.(string)
	}
	name := ""
	if u, err := user.LookupId(strconv.FormatUint(uint64(uid), 10)); err == nil {
		name = u.Username
	}
	r.users.Store(uid, name)
	return name
}

// CgroupPath picks the process's cgroup path from /proc/<pid>/cgroup: the
// unified (0::) entry, or on hybrid hosts where that is "/", the
// name=systemd entry.
func CgroupPath(procCgroup []byte) string {
	var unified, systemd string
	sc := bufio.NewScanner(bytes.NewReader(procCgroup))
	for sc.Scan() {
		parts := strings.SplitN(sc.Text(), ":", 3)
		if len(parts) != 3 {
			continue
		}
		switch {
		case parts[0] == "0" && parts[1] == "":
			unified = parts[2]
		case parts[1] == "name=systemd":
			systemd = parts[2]
		}
	}
	if unified != "" && unified != "/" {
		return unified
	}
	if systemd != "" {
		return systemd
	}
	return unified
}

// SystemdUnit is the innermost systemd unit (service or scope) of a cgroup path.
func SystemdUnit(cgroup string) string {
	parts := strings.Split(cgroup, "/")
	for i := len(parts) - 1; i >= 0; i-- {
		p := parts[i]
		if strings.HasSuffix(p, ".service") || strings.HasSuffix(p, ".scope") {
			return p
		}
	}
	return ""
}

var containerIDRe = regexp.MustCompile(`(?:^|[/\-:])([0-9a-f]{64})(?:\.scope)?$`)

// ContainerID extracts a container id (64 hex digits) from a cgroup path
// written by Docker, containerd or CRI-O, in cgroupfs or systemd layouts.
func ContainerID(cgroup string) string {
	parts := strings.Split(strings.TrimRight(cgroup, "/"), "/")
	for i := len(parts) - 1; i >= 0; i-- {
		if m := containerIDRe.FindStringSubmatch(parts[i]); m != nil {
			return m[1]
		}
	}
	return ""
}
