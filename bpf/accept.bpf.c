// SPDX-License-Identifier: GPL-2.0
/*
 * Accept probe: on every successful accept(2)/accept4(2) by a managed uid,
 * send (pid, tgid, uid, fd, timestamp) to user space through a ring buffer
 * and count the connection per uid. The socket behind the new descriptor is
 * remembered (socket address -> uid) in the acceptor's own context, so the
 * softirq-context inet_sock_set_state tracepoint can count its close without
 * reading the current task, which is unrelated there.
 *
 * No vmlinux.h: the tracepoint contexts are laid out as the format files in
 * /sys/kernel/tracing/events say, and the few kernel structs walked from the
 * task to the socket are declared with preserve_access_index, so libbpf
 * relocates their field offsets against the running kernel's BTF (CO-RE).
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include "broker_accept.h"

#define TCP_CLOSE 7
#define MAX_MANAGED_UIDS 65536
#define MAX_TRACKED_SOCKETS 262144

char LICENSE[] SEC("license") = "GPL";

/* syscalls:sys_exit_accept4 and sys_exit_accept: ret at offset 16. */
struct syscall_exit_ctx {
	__u64 common;
	__s32 syscall_nr;
	__s32 pad;
	__s64 ret;
};

/* sock:inet_sock_set_state, first fields. */
struct sock_state_ctx {
	__u64 common;
	const void *skaddr;
	__s32 oldstate;
	__s32 newstate;
	__u16 sport;
	__u16 dport;
	__u16 family;
	__u16 protocol;
};

struct socket___broker {
	void *sk;
} __attribute__((preserve_access_index));

struct file___broker {
	void *private_data;
} __attribute__((preserve_access_index));

struct fdtable___broker {
	unsigned int max_fds;
	struct file___broker **fd;
} __attribute__((preserve_access_index));

struct files_struct___broker {
	struct fdtable___broker *fdt;
} __attribute__((preserve_access_index));

struct task_struct___broker {
	struct files_struct___broker *files;
} __attribute__((preserve_access_index));

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_MANAGED_UIDS);
	__type(key, __u32);
	__type(value, __u8);
} managed_uids SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

/* Events lost because the ring buffer was full. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} ringbuf_drops SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_MANAGED_UIDS);
	__type(key, __u32);
	__type(value, struct uid_counters);
} uid_stats SEC(".maps");

/* Accepted sockets still open: socket address -> owner uid. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_TRACKED_SOCKETS);
	__type(key, __u64);
	__type(value, __u32);
} socket_owner SEC(".maps");

static __always_inline void count_drop(__u32 uid)
{
	__u32 zero = 0;
	__u64 *drops = bpf_map_lookup_elem(&ringbuf_drops, &zero);
	struct uid_counters *counters = bpf_map_lookup_elem(&uid_stats, &uid);

	if (drops)
		*drops += 1;
	if (counters)
		__sync_fetch_and_add(&counters->drops, 1);
}

static __always_inline void count_accept(__u32 uid)
{
	struct uid_counters *counters = bpf_map_lookup_elem(&uid_stats, &uid);
	struct uid_counters fresh = { .accepts = 1 };

	if (counters)
		__sync_fetch_and_add(&counters->accepts, 1);
	else
		bpf_map_update_elem(&uid_stats, &uid, &fresh, BPF_NOEXIST);
}

/* Walk current->files->fdt->fd[fd]->private_data->sk. Returns 0 if any step fails. */
static __always_inline __u64 socket_of_fd(int fd)
{
	struct task_struct___broker *task = (void *)bpf_get_current_task();
	struct fdtable___broker *fdt = BPF_CORE_READ(task, files, fdt);
	struct file___broker **files;
	struct file___broker *file;
	struct socket___broker *sock;

	if (!fdt || fd < 0 || (unsigned int)fd >= BPF_CORE_READ(fdt, max_fds))
		return 0;
	files = BPF_CORE_READ(fdt, fd);
	if (bpf_probe_read_kernel(&file, sizeof(file), &files[fd]) || !file)
		return 0;
	sock = BPF_CORE_READ(file, private_data);
	if (!sock)
		return 0;
	return (__u64)BPF_CORE_READ(sock, sk);
}

static __always_inline int on_accept_exit(struct syscall_exit_ctx *ctx)
{
	__u64 uid_gid = bpf_get_current_uid_gid();
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 uid = (__u32)uid_gid;
	struct accept_event *event;
	__u64 sk;

	if (ctx->ret < 0 || !bpf_map_lookup_elem(&managed_uids, &uid))
		return 0;
	count_accept(uid);
	sk = socket_of_fd((int)ctx->ret);
	if (sk)
		bpf_map_update_elem(&socket_owner, &sk, &uid, BPF_ANY);

	event = bpf_ringbuf_reserve(&events, sizeof(*event), 0);
	if (!event) {
		count_drop(uid);
		return 0;
	}
	event->ts_ns = bpf_ktime_get_ns();
	event->pid = (__u32)pid_tgid;
	event->tgid = pid_tgid >> 32;
	event->uid = uid;
	event->fd = (__s32)ctx->ret;
	bpf_ringbuf_submit(event, 0);
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_accept4")
int broker_exit_accept4(struct syscall_exit_ctx *ctx)
{
	return on_accept_exit(ctx);
}

SEC("tracepoint/syscalls/sys_exit_accept")
int broker_exit_accept(struct syscall_exit_ctx *ctx)
{
	return on_accept_exit(ctx);
}

/* Runs in softirq context too: attribute only through socket_owner. */
SEC("tracepoint/sock/inet_sock_set_state")
int broker_sock_state(struct sock_state_ctx *ctx)
{
	__u64 sk = (__u64)ctx->skaddr;
	struct uid_counters *counters;
	__u32 *uid;

	if (ctx->newstate != TCP_CLOSE)
		return 0;
	uid = bpf_map_lookup_elem(&socket_owner, &sk);
	if (!uid)
		return 0;
	counters = bpf_map_lookup_elem(&uid_stats, uid);
	if (counters)
		__sync_fetch_and_add(&counters->closes, 1);
	bpf_map_delete_elem(&socket_owner, &sk);
	return 0;
}
