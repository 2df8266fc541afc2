package broker

import (
	"context"
	"net"
	"strconv"
)

// Identity is who is calling, built from kernel facts only — never from anything
// the client sends. The agent's resolver fills it; policy matches on it; audit
// events carry it as "process".
type Identity struct {
	PID  int32  // pid in pgward's pid namespace (SO_PEERCRED)
	UID  uint32 // effective uid at connect()
	GID  uint32 // effective gid at connect()
	User string // user name of UID, if it has one

	Exe         string // /proc/<pid>/exe through the pinned process
	Comm        string // task comm (from the eBPF record when attested, else /proc)
	Cgroup      string // cgroup v2 path (or the unified/systemd path on hybrid hosts)
	SystemdUnit string // unit derived from the cgroup path, e.g. "billing.service"
	ContainerID string // container id derived from the cgroup path, if any

	// Filled from the eBPF connect record when one matched (Attested).
	Attested  bool
	CgroupID  uint64 // cgroup2 id at connect()
	StartTime uint64 // process start time, ns since boot
	NSPID     int32  // pid as seen in the caller's own pid namespace

	// Kubernetes, when the container id maps to a pod.
	Pod *Pod

	// Pinned is true when the process was pinned with a pidfd while /proc was read.
	Pinned bool
}

// Pod is the Kubernetes pod a caller runs in.
type Pod struct {
	Namespace      string
	Name           string
	ServiceAccount string
	Labels         map[string]string
}

// String is a short description fit for error messages to the client:
// "uid 1001 (billing), pid 4242, exe /usr/bin/psql".
func (id Identity) String() string {
	s := "uid " + strconv.FormatUint(uint64(id.UID), 10)
	if id.User != "" {
		s += " (" + id.User + ")"
	}
	s += ", pid " + strconv.FormatInt(int64(id.PID), 10)
	if id.Exe != "" {
		s += ", exe " + id.Exe
	}
	return s
}

// IdentityResolver learns who is on the other end of an accepted connection.
// It is called once per connection, right after accept, before any byte of the
// client is read. A non-nil error refuses the connection as an identity
// verification failure.
type IdentityResolver interface {
	Resolve(ctx context.Context, conn net.Conn) (Identity, error)
}

// IdentityResolverFunc adapts a function to IdentityResolver.
type IdentityResolverFunc func(ctx context.Context, conn net.Conn) (Identity, error)

// Resolve calls f.
func (f IdentityResolverFunc) Resolve(ctx context.Context, conn net.Conn) (Identity, error) {
	return f(ctx, conn)
}
