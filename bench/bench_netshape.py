"""Time the Shaper on many users: apply, no-op apply, rate change, warm boost.

Creates a network namespace with a veth pair, shapes the veth with USERS
managed uids and prints one Markdown table row per step. No traffic is sent.
The namespace is deleted at the end, also on failure.

    sudo PYTHONPATH=. python bench/bench_netshape.py [--users 600] [--boosts 200]

Needs root and `make bpf`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace

from broker.netshape import Shaper
from broker.policy import ClassRates, InterfacePolicy

MBIT = 10**6


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--users", type=int, default=600, help="managed uids (default 600)"
    )
    parser.add_argument(
        "--boosts", type=int, default=200, help="set_user_state calls to time"
    )
    return parser.parse_args()


def setup_namespace(netns: str, dev: str) -> None:
    subprocess.run(["ip", "netns", "add", netns], check=True)
    subprocess.run(
        [
            "ip",
            "-n",
            netns,
            "link",
            "add",
            dev,
            "type",
            "veth",
            "peer",
            "name",
            dev + "p",
        ],
        check=True,
    )
    subprocess.run(["ip", "-n", netns, "link", "set", dev, "up"], check=True)


def row(step: str, seconds: float, detail: str) -> None:
    print(f"| {step} | {seconds * 1000:.1f} ms | {detail} |", flush=True)


def run(shaper: Shaper, policy: InterfacePolicy, users: int, boosts: int) -> None:
    uids = list(range(20000, 20000 + users))
    print("| step | time | detail |\n|---|---|---|")

    report = shaper.apply(uids)
    row(f"first apply, {users} users", report.seconds, f"{report.writes} writes")
    report = shaper.apply(uids)
    row("second apply (no-op)", report.seconds, f"{report.writes} writes")

    shaper.set_policy(replace(policy, user=ClassRates(8 * MBIT, 30 * MBIT)))
    report = shaper.apply(uids)
    row(
        "apply with a changed user rate",
        report.seconds,
        f"{len(report.changed)} classes changed",
    )

    latencies = []
    for i in range(boosts):
        started = time.perf_counter()
        shaper.set_user_state(uids[i % users], "heavy" if i % 2 == 0 else None)
        latencies.append(time.perf_counter() - started)
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    row(
        f"set_user_state, median of {boosts}",
        statistics.median(latencies),
        f"p99 {p99 * 1000:.2f} ms",
    )

    started = time.perf_counter()
    rows = shaper.stats()
    row("stats()", time.perf_counter() - started, f"{len(rows)} classes")

    started = time.perf_counter()
    shaper.remove()
    row("remove()", time.perf_counter() - started, "qdisc deleted")


def main() -> int:
    args = parse_args()
    if os.geteuid() != 0:
        print("bench_netshape: needs root (network namespace, BPF)", file=sys.stderr)
        return 1
    netns, dev = f"bnsbench{os.getpid()}", "bshbench0"
    policy = InterfacePolicy(
        dev,
        10_000 * MBIT,
        ClassRates(10 * MBIT, 10_000 * MBIT),
        ClassRates(5 * MBIT, 20 * MBIT),
        (("heavy", ClassRates(50 * MBIT, 200 * MBIT)),),
    )
    setup_namespace(netns, dev)
    try:
        with Shaper(policy, netns=netns) as shaper:
            run(shaper, policy, args.users, args.boosts)
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
