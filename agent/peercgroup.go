package agent

import (
	"os"
	"path/filepath"
	"strconv"

	"github.com/pgward/pgward/broker"
)

var _ broker.PeerCgroups = (*Resolver)(nil)

// PeerCgroup implements broker.PeerCgroups: the cgroup path of pid, read
// from /proc without pinning the process. The broker uses it only to count
// login slots per cgroup (limits.connections_per_cgroup), never as identity.
func (r *Resolver) PeerCgroup(pid int32) string {
	root := r.ProcRoot
	if root == "" {
		root = "/proc"
	}
	b, err := os.ReadFile(filepath.Join(root, strconv.Itoa(int(pid)), "cgroup"))
	if err != nil {
		return ""
	}
	return CgroupPath(b)
}
