/* Types shared by accept.bpf.c and broker/probes.py. Keep the Python
 * struct formats in probes.py in step with these layouts. */
#ifndef BROKER_ACCEPT_H
#define BROKER_ACCEPT_H

#include <linux/types.h>

/* One ring-buffer record per accepted connection of a managed uid. */
struct accept_event {
	__u64 ts_ns;    /* bpf_ktime_get_ns() at syscall exit (CLOCK_MONOTONIC) */
	__u32 pid;      /* thread id */
	__u32 tgid;     /* process id */
	__u32 uid;
	__s32 fd;       /* the new connection's descriptor */
};

/* Per-uid counters, updated with atomic adds. */
struct uid_counters {
	__u64 accepts;  /* connections accepted since the probe was loaded */
	__u64 closes;   /* accepted connections that reached TCP_CLOSE */
	__u64 drops;    /* events of this uid lost to a full ring buffer */
};

#endif
