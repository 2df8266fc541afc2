// Package bpf owns pgward's eBPF programs and their loader.
//
// The programs (connect.c, compiled by bpf2go into the committed
// connect_bpfel.go and connect_bpfel.o, so building needs no clang) record
// kernel-attested connects to the endpoints pgward cares about:
//
//   - cgroup/connect4 and cgroup/connect6 see TCP connects, IPv4-mapped IPv6
//     destinations included;
//   - cgroup/connect_unix (Linux ≥ 6.7) sees Unix socket connects; on older
//     kernels the tracepoint syscalls/sys_enter_connect stands in, observe
//     only (it cannot refuse, reads the address from racy user memory and does
//     not see io_uring);
//   - the tracepoint sock/inet_sock_set_state adds the source port of a
//     recorded TCP connect once it leaves SYN_SENT.
//
// An endpoint is Guarded (a database: a connect by anyone but pgward is a
// direct connect, refused with ECONNREFUSED when enforcement is on) or
// Watched (pgward's own listener: the connect is recorded so pgward can tie
// the accepted connection to the process that made it). Connects to any other
// endpoint return after a hash lookup or two and emit nothing.
//
// Each recorded connect becomes an [Event] in one ring buffer, built in the
// kernel from the connecting task: tgid, pid, effective uid and gid, comm,
// cgroup id, the process start time, its pid in its own pid namespace and the
// connecting socket's inode.
//
// Kernel: BTF (CO-RE), ring buffers and bpf_set_retval put the floor at
// Linux 5.18 for TCP; cgroup/connect_unix needs 6.7. Privileges: CAP_BPF,
// CAP_PERFMON (task and socket reads), CAP_NET_ADMIN (cgroup attach) and
// CAP_SYS_ADMIN where tracefs must be mounted, which Load does when needed.
//
// Cost, measured by BenchmarkConnectLoopback with kernel BPF statistics: a
// connect to an endpoint that is neither guarded nor watched spends about
// 0.16 µs in cgroup/connect4 (a loopback connect() takes about 60 µs); a
// recorded connect about 7 µs, plus about 5 µs in inet_sock_set_state for a
// watched TCP endpoint.
//
// Lifecycle: [Load] loads and attaches everything it can and returns a
// [Probes] that owns every map, program and link; [Probes.Read] blocks for
// the next event; [Probes.Close] detaches in reverse order and makes Read
// return [ErrClosed]. Load errors wrap [ErrUnsupported] or [ErrPermission] so
// that callers can fall back to running without eBPF.
//
// Limits, deliberately: Unix endpoints match by the path given to connect(),
// byte for byte: a relative path, a symlink or a bind mount to the same socket
// is another path (protect database sockets with file permissions too). TCP
// endpoints match by destination address and port; guard a local server with
// an unspecified address (":5432" as 0.0.0.0:5432 or [::]:5432), which
// matches every destination on that port, since 127.0.0.2, ::1 and the
// host's own addresses all reach it. The package resolves no names, keeps no
// state about processes and does not interpret events: that is the agent's
// tracker.
package bpf
