/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The few kernel and UAPI definitions connect.c needs, so that it builds
 * with libbpf's headers alone: no vmlinux.h, no <linux/...> headers (which would
 * pull in the architecture's <asm/types.h>).
 *
 * Kernel-internal structs carry only the fields we read and are marked
 * preserve_access_index: their offsets are relocated against the running
 * kernel's BTF at load time (CO-RE), so the layout here need not match.
 * UAPI structs (bpf_sock_addr) are ABI and copied as is.
 */
#ifndef PGWARD_H
#define PGWARD_H

typedef unsigned char __u8;
typedef signed char __s8;
typedef unsigned short __u16;
typedef short __s16;
typedef unsigned int __u32;
typedef int __s32;
typedef unsigned long long __u64;
typedef long long __s64;
typedef __u16 __be16;
typedef __u32 __be32;
typedef __u64 __be64;
typedef __u32 __wsum;

#define AF_UNIX 1
#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define ECONNREFUSED 111

#define TCP_ESTABLISHED 1
#define TCP_SYN_SENT 2
#define TCP_CLOSE 7

#define UNIX_PATH_MAX 108

enum {
	BPF_MAP_TYPE_HASH = 1,
	BPF_MAP_TYPE_ARRAY = 2,
	BPF_MAP_TYPE_PERCPU_ARRAY = 6,
	BPF_MAP_TYPE_LRU_HASH = 9,
	BPF_MAP_TYPE_RINGBUF = 27,
};

enum {
	BPF_ANY = 0,
};

/* UAPI: the context of cgroup/connect{4,6,_unix} programs. */
struct bpf_sock_addr {
	__u32 user_family;
	__u32 user_ip4;
	__u32 user_ip6[4];
	__u32 user_port;
	__u32 family;
	__u32 type;
	__u32 protocol;
	__u32 msg_src_ip4;
	__u32 msg_src_ip6[4];
	union {
		struct bpf_sock *sk; /* __bpf_md_ptr */
		__u64 :64;
	} __attribute__((aligned(8)));
};

/* Kernel-internal, relocated (CO-RE). */

typedef struct {
	__u32 val;
} kuid_t;

typedef struct {
	__u32 val;
} kgid_t;

struct cred {
	kuid_t euid;
	kgid_t egid;
} __attribute__((preserve_access_index));

/* Indexed by a variable (numbers[level]), so its size must be the kernel's. */
struct upid {
	int nr;
	void *ns;
} __attribute__((preserve_access_index));
_Static_assert(sizeof(struct upid) == 16, "struct upid");

struct pid {
	unsigned int level;
	struct upid numbers[];
} __attribute__((preserve_access_index));

struct file;

struct fdtable {
	unsigned int max_fds;
	struct file **fd;
} __attribute__((preserve_access_index));

struct files_struct {
	struct fdtable *fdt;
} __attribute__((preserve_access_index));

struct task_struct {
	int pid;
	int tgid;
	struct task_struct *group_leader;
	struct pid *thread_pid;
	__u64 start_boottime;
	const struct cred *cred;
	struct files_struct *files;
} __attribute__((preserve_access_index));

struct inode {
	unsigned long i_ino;
} __attribute__((preserve_access_index));

struct file {
	struct inode *f_inode;
	void *private_data;
} __attribute__((preserve_access_index));

struct socket {
	struct file *file;
} __attribute__((preserve_access_index));

/* A socket and its inode are allocated together (SOCK_INODE()). */
struct socket_alloc {
	struct socket socket;
	struct inode vfs_inode;
} __attribute__((preserve_access_index));

struct sock {
	struct socket *sk_socket;
	unsigned long sk_ino; /* since 6.17; older kernels use socket_alloc */
} __attribute__((preserve_access_index));

struct sockaddr {
	unsigned short sa_family;
} __attribute__((preserve_access_index));

struct bpf_sock_addr_kern {
	struct sock *sk;
	struct sockaddr *uaddr;
	__u32 uaddrlen;
} __attribute__((preserve_access_index));

struct trace_entry {
	unsigned short type;
} __attribute__((preserve_access_index));

struct trace_event_raw_sys_enter {
	struct trace_entry ent;
	long id;
	unsigned long args[6];
} __attribute__((preserve_access_index));

struct trace_event_raw_inet_sock_set_state {
	struct trace_entry ent;
	const void *skaddr;
	int oldstate;
	int newstate;
	__u16 sport;
	__u16 dport;
	__u16 family;
	__u16 protocol;
	__u8 saddr[4];
	__u8 daddr[4];
	__u8 saddr_v6[16];
	__u8 daddr_v6[16];
} __attribute__((preserve_access_index));

#endif /* PGWARD_H */
