//go:build ignore

/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * pgward's connect probes: kernel-attested records of connects to the
 * endpoints pgward cares about, and refusal of direct connects to guarded
 * database endpoints.
 *
 *   cgroup/connect4, cgroup/connect6   TCP connects (v4-mapped v6 included)
 *   cgroup/connect_unix                Unix socket connects (kernel >= 6.7)
 *   tracepoint/syscalls/sys_enter_connect
 *                                      observe-only fallback for Unix sockets
 *   tracepoint/sock/inet_sock_set_state
 *                                      the source port of recorded TCP connects
 *
 * A connect to an endpoint in tcp_endpoints/unix_endpoints emits one event;
 * every other connect returns after one or two hash lookups. A connect to a
 * GUARDED endpoint by a process that is not exempt is a direct connect, and
 * is refused with ECONNREFUSED when enforcement is on. A connect to a
 * WATCHED endpoint (pgward's own listeners) is recorded so that pgward can
 * tie the accepted connection to the connecting process.
 */

#include "pgward.h" /* first: the types libbpf's headers use */

#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>

char __license[] SEC("license") = "Dual BSD/GPL";

enum event_kind {
	KIND_CONNECT4 = 1,
	KIND_CONNECT6 = 2,
	KIND_CONNECT_UNIX = 3,
	KIND_CONNECT_UNIX_TP = 4, /* sys_enter_connect fallback: observe only */
	KIND_TCP_ESTABLISHED = 5, /* source port of an earlier connect4/6 event */
};

/* Endpoint flags (map values) and event flags. */
enum {
	FLAG_GUARDED = 1 << 0,
	FLAG_WATCHED = 1 << 1,
	FLAG_BLOCKED = 1 << 2,
};

struct event {
	__u32 kind;
	__u32 flags;
	__u32 tgid;
	__u32 pid;
	__u32 uid; /* effective, as SO_PEERCRED */
	__u32 gid;
	__u64 cgroup_id;
	__u64 start_time; /* thread group leader's start_boottime, ns */
	__u64 inode;      /* the connecting socket's inode */
	__u64 ts;         /* bpf_ktime_get_boot_ns() */
	__u32 nspid;      /* tgid in the task's own (innermost) pid namespace */
	__u16 family;
	__u16 dport;
	__u16 sport;
	__u16 path_len;
	__u32 _pad;
	__u8 daddr[16]; /* IPv4 as v4-mapped IPv6 */
	__u8 saddr[16];
	char comm[16];
	char path[UNIX_PATH_MAX];
};

struct tcp_key {
	__u8 addr[16]; /* IPv4 as v4-mapped IPv6; all zero: any address */
	__u16 port;    /* host byte order */
	__u16 _pad;
};

struct unix_key {
	char path[UNIX_PATH_MAX]; /* NUL padded; abstract names start with NUL */
};

struct config {
	__u32 exempt_tgid;
	__u32 enforce;
	__u64 exempt_cgroup_id;
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct tcp_key);
	__type(value, __u32);
} tcp_endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct unix_key);
	__type(value, __u32);
} unix_endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} lost SEC(".maps");

/* Watched TCP connects recorded by connect4/6, keyed by struct sock address, waiting
 * for inet_sock_set_state to leave SYN_SENT with the source port chosen. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct event);
} pending SEC(".maps");

/* kfuncs (libbpf 1.1's headers predate them). */
extern void *bpf_cast_to_kern_ctx(void *obj) __ksym;

static __always_inline void count_lost(void)
{
	__u32 zero = 0;
	__u64 *n = bpf_map_lookup_elem(&lost, &zero);
	if (n)
		*n += 1;
}

static __always_inline __u64 sock_inode(struct sock *sk)
{
	if (bpf_core_field_exists(sk->sk_ino))
		return BPF_CORE_READ(sk, sk_ino);

	struct socket *sock = BPF_CORE_READ(sk, sk_socket);
	if (!sock)
		return 0;
	struct socket_alloc *sa = (void *)sock - bpf_core_field_offset(struct socket_alloc, socket);
	return BPF_CORE_READ(sa, vfs_inode.i_ino);
}

/* Fill the identity of the current task. */
static __always_inline void fill_task(struct event *e)
{
	__u64 id = bpf_get_current_pid_tgid();
	e->tgid = id >> 32;
	e->pid = (__u32)id;
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->ts = bpf_ktime_get_boot_ns();
	bpf_get_current_comm(e->comm, sizeof(e->comm));

	struct task_struct *task = (void *)bpf_get_current_task();
	const struct cred *cred = BPF_CORE_READ(task, cred);
	e->uid = BPF_CORE_READ(cred, euid.val);
	e->gid = BPF_CORE_READ(cred, egid.val);

	struct task_struct *leader = BPF_CORE_READ(task, group_leader);
	e->start_time = BPF_CORE_READ(leader, start_boottime);
	struct pid *pid = BPF_CORE_READ(leader, thread_pid);
	__u32 level = BPF_CORE_READ(pid, level);
	/* pid namespaces nest at most 32 deep (MAX_PID_NS_LEVEL). */
	bpf_core_read(&e->nspid, sizeof(e->nspid), &pid->numbers[level & 31].nr);
}

static __always_inline int exempt(const struct config *cfg)
{
	if (!cfg)
		return 0;
	if (cfg->exempt_tgid && cfg->exempt_tgid == bpf_get_current_pid_tgid() >> 32)
		return 1;
	/* Never exempt id 1: on hybrid hierarchies most tasks report it. */
	if (cfg->exempt_cgroup_id > 1 && cfg->exempt_cgroup_id == bpf_get_current_cgroup_id())
		return 1;
	return 0;
}

/* decide turns endpoint flags into event flags: 0 means ignore the connect. */
static __always_inline __u32 decide(__u32 flags, int *deny)
{
	__u32 zero = 0;
	struct config *cfg = bpf_map_lookup_elem(&config, &zero);

	*deny = 0;
	flags &= FLAG_GUARDED | FLAG_WATCHED;
	if ((flags & FLAG_GUARDED) && exempt(cfg))
		flags &= ~FLAG_GUARDED;
	if ((flags & FLAG_GUARDED) && cfg && cfg->enforce) {
		flags |= FLAG_BLOCKED;
		*deny = 1;
	}
	return flags;
}

static __always_inline int refuse(void)
{
	bpf_set_retval(-ECONNREFUSED);
	return 0;
}

static __always_inline int on_tcp_connect(struct bpf_sock_addr *ctx, struct tcp_key *key, __u32 kind)
{
	__u32 *ep = bpf_map_lookup_elem(&tcp_endpoints, key);
	if (!ep) {
		struct tcp_key any = {.port = key->port};
		ep = bpf_map_lookup_elem(&tcp_endpoints, &any);
		if (!ep)
			return 1;
	}

	int deny;
	__u32 flags = decide(*ep, &deny);
	if (!flags)
		return 1;

	/* bpf_skc_to_tcp_sock (5.9) rather than the bpf_cast_to_kern_ctx kfunc
	 * (6.2), so that TCP works on kernels that need the Unix fallback. */
	struct sock *sk = (struct sock *)bpf_skc_to_tcp_sock(ctx->sk);
	if (!sk)
		return deny ? refuse() : 1;

	struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count_lost();
		return deny ? refuse() : 1;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->kind = kind;
	e->flags = flags;
	e->family = ctx->user_family;
	e->dport = key->port;
	__builtin_memcpy(e->daddr, key->addr, sizeof(e->daddr));
	e->inode = sock_inode(sk);
	fill_task(e);

	if ((flags & FLAG_WATCHED) && !deny) {
		__u64 skp = (__u64)sk;
		bpf_map_update_elem(&pending, &skp, e, BPF_ANY);
	}
	bpf_ringbuf_submit(e, 0);
	return deny ? refuse() : 1;
}

SEC("cgroup/connect4")
int connect4(struct bpf_sock_addr *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return 1;

	struct tcp_key key = {};
	key.addr[10] = 0xff;
	key.addr[11] = 0xff;
	__u32 ip4 = ctx->user_ip4;
	__builtin_memcpy(&key.addr[12], &ip4, 4);
	key.port = bpf_ntohs((__u16)ctx->user_port);
	return on_tcp_connect(ctx, &key, KIND_CONNECT4);
}

SEC("cgroup/connect6")
int connect6(struct bpf_sock_addr *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return 1;

	struct tcp_key key = {};
	__u32 w;
	w = ctx->user_ip6[0];
	__builtin_memcpy(&key.addr[0], &w, 4);
	w = ctx->user_ip6[1];
	__builtin_memcpy(&key.addr[4], &w, 4);
	w = ctx->user_ip6[2];
	__builtin_memcpy(&key.addr[8], &w, 4);
	w = ctx->user_ip6[3];
	__builtin_memcpy(&key.addr[12], &w, 4);
	key.port = bpf_ntohs((__u16)ctx->user_port);
	return on_tcp_connect(ctx, &key, KIND_CONNECT6);
}

/*
 * read_unix_path fills key from a sockaddr_un's sun_path of plen bytes at
 * src (kernel memory if kernel, else user memory). File system names stop at
 * the first NUL; abstract names (leading NUL) keep all plen bytes. Returns the
 * name's length, or 0 when there is nothing to look up.
 */
static __always_inline __u64 read_unix_path(struct unix_key *key, const char *src, __u64 plen, int kernel)
{
	char first = 0;

	if (plen == 0)
		return 0;
	if (plen > UNIX_PATH_MAX)
		plen = UNIX_PATH_MAX;

	if (kernel ? bpf_probe_read_kernel(&first, 1, src) : bpf_probe_read_user(&first, 1, src))
		return 0;

	if (first == 0) {
		/* Abstract. */
		if (kernel ? bpf_probe_read_kernel(key->path, plen, src) : bpf_probe_read_user(key->path, plen, src))
			return 0;
		return plen;
	}

	/* Reads at most size-1 bytes and NUL terminates: a 108-byte name without
	 * NUL is cut to 107, which no endpoint in the map can have. */
	__u64 size = plen + 1;
	if (size > UNIX_PATH_MAX)
		size = UNIX_PATH_MAX;
	long n = kernel ? bpf_probe_read_kernel_str(key->path, size, src) : bpf_probe_read_user_str(key->path, size, src);
	if (n <= 1)
		return 0;
	return n - 1;
}

static __always_inline void fill_unix(struct event *e, const struct unix_key *key, __u64 plen, __u32 kind, __u32 flags)
{
	__builtin_memset(e, 0, sizeof(*e));
	e->kind = kind;
	e->flags = flags;
	e->family = AF_UNIX;
	e->path_len = plen;
	__builtin_memcpy(e->path, key->path, sizeof(e->path));
	fill_task(e);
}

SEC("cgroup/connect_unix")
int connect_unix(struct bpf_sock_addr *ctx)
{
	struct bpf_sock_addr_kern *kctx = bpf_cast_to_kern_ctx(ctx);
	struct unix_key key = {};

	__u64 alen = kctx->uaddrlen;
	if (alen <= 2)
		return 1;
	__u64 plen = read_unix_path(&key, (const char *)kctx->uaddr + 2, alen - 2, 1);
	if (!plen)
		return 1;

	__u32 *ep = bpf_map_lookup_elem(&unix_endpoints, &key);
	if (!ep)
		return 1;
	int deny;
	__u32 flags = decide(*ep, &deny);
	if (!flags)
		return 1;

	struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count_lost();
		return deny ? refuse() : 1;
	}
	fill_unix(e, &key, plen, KIND_CONNECT_UNIX, flags);
	e->inode = sock_inode(kctx->sk);
	bpf_ringbuf_submit(e, 0);
	return deny ? refuse() : 1;
}

/* The inode behind file descriptor fd of the current task. */
static __always_inline __u64 fd_inode(int fd)
{
	struct task_struct *task = (void *)bpf_get_current_task();
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	if (!fdt || fd < 0 || (unsigned int)fd >= BPF_CORE_READ(fdt, max_fds))
		return 0;
	struct file **fds = BPF_CORE_READ(fdt, fd);
	struct file *f = 0;
	if (bpf_probe_read_kernel(&f, sizeof(f), &fds[fd]) || !f)
		return 0;
	return BPF_CORE_READ(f, f_inode, i_ino);
}

/* Observe-only fallback for kernels without cgroup/connect_unix. It reads the
 * address from user memory before the kernel copies it, so a racing thread can
 * change it; io_uring connects are not seen. */
SEC("tracepoint/syscalls/sys_enter_connect")
int sys_enter_connect(struct trace_event_raw_sys_enter *ctx)
{
	const char *uaddr = (const char *)ctx->args[1];
	__u64 alen = ctx->args[2];
	__u16 family = 0;

	if (alen <= 2 || bpf_probe_read_user(&family, sizeof(family), uaddr) || family != AF_UNIX)
		return 0;

	struct unix_key key = {};
	__u64 plen = read_unix_path(&key, uaddr + 2, alen - 2, 0);
	if (!plen)
		return 0;
	__u32 *ep = bpf_map_lookup_elem(&unix_endpoints, &key);
	if (!ep)
		return 0;
	int deny;
	__u32 flags = decide(*ep, &deny) & ~FLAG_BLOCKED;
	if (!flags)
		return 0;

	struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count_lost();
		return 0;
	}
	fill_unix(e, &key, plen, KIND_CONNECT_UNIX_TP, flags);
	e->inode = fd_inode((int)ctx->args[0]);
	bpf_ringbuf_submit(e, 0);
	return 0;
}

/* A recorded TCP connect leaves SYN_SENT: with ESTABLISHED the source port is
 * known. Runs in softirq, so the identity comes from the pending record, not
 * from the current task. */
SEC("tracepoint/sock/inet_sock_set_state")
int inet_sock_set_state(struct trace_event_raw_inet_sock_set_state *ctx)
{
	if (ctx->protocol != IPPROTO_TCP || ctx->oldstate != TCP_SYN_SENT)
		return 0;

	__u64 skp = (__u64)ctx->skaddr;
	struct event *p = bpf_map_lookup_elem(&pending, &skp);
	if (!p)
		return 0;
	/* The address may have been reused by a socket we never saw connect. */
	if (ctx->newstate != TCP_ESTABLISHED || p->dport != ctx->dport)
		goto out;

	struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count_lost();
		goto out;
	}
	__builtin_memcpy(e, p, sizeof(*e));
	e->kind = KIND_TCP_ESTABLISHED;
	e->ts = bpf_ktime_get_boot_ns();
	e->sport = ctx->sport;
	e->family = ctx->family;
	__builtin_memset(e->saddr, 0, sizeof(e->saddr));
	if (ctx->family == AF_INET) {
		e->saddr[10] = 0xff;
		e->saddr[11] = 0xff;
		bpf_probe_read_kernel(&e->saddr[12], 4, ctx->saddr);
	} else {
		bpf_probe_read_kernel(e->saddr, 16, ctx->saddr_v6);
	}
	bpf_ringbuf_submit(e, 0);
out:
	bpf_map_delete_elem(&pending, &skp);
	return 0;
}
