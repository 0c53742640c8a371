// SPDX-License-Identifier: GPL-2.0
/*
 * Egress classifier for the broker's per-user HTB classes: a cls_bpf program
 * in direct-action mode that looks up the owner uid of each packet's socket
 * in uid_classid and puts the packet into that user's class.
 *
 * Three kernel behaviours shape this program (net/sched/cls_bpf.c and
 * net/sched/sch_htb.c):
 * - The class id written to skb->tc_classid is kept in a 16-bit field, so
 *   only the minor survives. cls_bpf adds the major of the filter's own
 *   classid, so the filter must be created with the qdisc's major (1:).
 * - TC_ACT_UNSPEC makes HTB try the next filter and then its default class.
 *   TC_ACT_OK with no class id selects the qdisc itself (X:0), which HTB
 *   sends through its direct queue, unshaped.
 * - A class id that names no class also sends the packet to the default
 *   class, so a stale map entry cannot bypass shaping.
 *
 * The context is the UAPI struct __sk_buff, which the verifier rewrites for
 * the running kernel, so the object needs no kernel headers and no vmlinux.h.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#define MAX_MANAGED_UIDS 65536

char LICENSE[] SEC("license") = "GPL";

/* Socket owner uid -> HTB class id (major << 16 | minor), kept by the broker. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_MANAGED_UIDS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, __u32);
} uid_classid SEC(".maps");

SEC("tc")
int classify_uid(struct __sk_buff *skb)
{
	__u32 uid, *classid;

	/*
	 * Packets without a socket (forwarded, ARP) go to the default class.
	 * bpf_get_socket_uid() would report them as the overflow uid (65534).
	 */
	if (!skb->sk)
		return TC_ACT_UNSPEC;

	uid = bpf_get_socket_uid(skb);
	classid = bpf_map_lookup_elem(&uid_classid, &uid);
	if (!classid)
		return TC_ACT_UNSPEC;

	skb->tc_classid = TC_H_MIN(*classid);
	return TC_ACT_OK;
}
