"""Report once, at start, which kernel features the broker can use."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from broker.cgroups import CGROUP_MOUNT, CgroupFS

log = logging.getLogger(__name__)

TRACEFS_CANDIDATES = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
TRACEPOINTS = (
    "syscalls/sys_exit_accept4",
    "syscalls/sys_exit_accept",
    "sock/inet_sock_set_state",
)


@dataclass(frozen=True)
class Features:
    """Kernel features found on this host."""

    cgroup2: bool
    controllers: frozenset[str]
    favordynmods: bool
    memory_recursiveprot: bool
    psi: bool
    btf: bool
    tracepoints: tuple[str, ...]
    libbpf: bool

    def lines(self) -> list[str]:
        """Return one line per feature, saying what is degraded when missing."""

        def mark(ok: bool) -> str:
            return "yes" if ok else "no"

        return [
            f"cgroup v2 at {CGROUP_MOUNT}: {mark(self.cgroup2)}"
            + (
                ""
                if self.cgroup2
                else " (warm slots disabled: needs a unified cgroup2 mount)"
            ),
            f"cgroup v2 controllers: {' '.join(sorted(self.controllers)) or 'none'}",
            f"favordynmods: {mark(self.favordynmods)}"
            + (
                ""
                if self.favordynmods
                else " (moves may stall longer under fork load; mount cgroup2 with favordynmods)"
            ),
            f"memory_recursiveprot: {mark(self.memory_recursiveprot)}",
            f"PSI: {mark(self.psi)}"
            + ("" if self.psi else " (pressure not collected)"),
            f"BTF: {mark(self.btf)}"
            + ("" if self.btf else " (CO-RE relocation needs /sys/kernel/btf/vmlinux)"),
            f"tracepoints: {' '.join(self.tracepoints) or 'none'}",
            f"libbpf.so.1: {mark(self.libbpf)}"
            + ("" if self.libbpf else " (install libbpf1)"),
        ]


def tracefs() -> Path | None:
    for candidate in TRACEFS_CANDIDATES:
        if (candidate / "events").is_dir():
            return candidate
    return None


def probe(cg: CgroupFS | None = None) -> Features:
    cg = cg or CgroupFS()
    cgroup2 = (cg.mount / "cgroup.controllers").is_file()
    controllers = frozenset(cg.controllers("/")) if cgroup2 else frozenset()
    options = cg.mount_options() if cgroup2 else set()
    trace_dir = tracefs()
    found = tuple(
        t for t in TRACEPOINTS if trace_dir and (trace_dir / "events" / t).is_dir()
    )
    try:
        import ctypes

        ctypes.CDLL("libbpf.so.1")
        libbpf = True
    except OSError:
        libbpf = False
    return Features(
        cgroup2=cgroup2,
        controllers=controllers,
        favordynmods="favordynmods" in options,
        memory_recursiveprot="memory_recursiveprot" in options,
        psi=Path("/proc/pressure/cpu").exists(),
        btf=Path("/sys/kernel/btf/vmlinux").exists(),
        tracepoints=found,
        libbpf=libbpf,
    )


def log_features(features: Features) -> None:
    for line in features.lines():
        log.info("feature: %s", line)
