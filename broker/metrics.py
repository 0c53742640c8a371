"""Prometheus text exposition of the daemon's status.

The daemon writes this text to /run/broker/metrics.prom every tick; point
node_exporter's textfile collector at it, or read it with
`broker status --prometheus`.
"""

from __future__ import annotations

from typing import Any, Iterable

# name, type, help, and the path into a user's status entry.
USER_METRICS = (
    (
        "broker_activations_total",
        "counter",
        "Processes moved into a warm slot.",
        ("counters", "activations"),
    ),
    (
        "broker_misses_total",
        "counter",
        "Accepts that found no free warm slot.",
        ("counters", "misses"),
    ),
    (
        "broker_reclaims_total",
        "counter",
        "Idle processes sent home.",
        ("counters", "reclaims"),
    ),
    (
        "broker_gone_total",
        "counter",
        "Processes that exited before the move.",
        ("counters", "gone"),
    ),
    (
        "broker_zombies_total",
        "counter",
        "Zombie processes skipped.",
        ("counters", "zombies"),
    ),
    (
        "broker_kernel_threads_total",
        "counter",
        "Kernel threads skipped.",
        ("counters", "kernel_threads"),
    ),
    (
        "broker_move_failures_total",
        "counter",
        "Moves the kernel rejected.",
        ("counters", "move_failures"),
    ),
    (
        "broker_returned_elsewhere_total",
        "counter",
        "Processes that could not return to their home cgroup.",
        ("counters", "returned_elsewhere"),
    ),
    (
        "broker_stopped_with_unit_total",
        "counter",
        "Processes killed because systemd stopped their service while they were in a slot.",
        ("counters", "stopped_with_unit"),
    ),
    (
        "broker_accepts_total",
        "counter",
        "Connections accepted, counted in BPF.",
        ("accepts",),
    ),
    (
        "broker_open_connections",
        "gauge",
        "Accepted connections not yet closed.",
        ("open_connections",),
    ),
    (
        "broker_ringbuf_drops_total",
        "counter",
        "Accept events lost to a full ring buffer.",
        ("drops",),
    ),
    ("broker_slots_free", "gauge", "Free warm slots.", ("slots_free",)),
    ("broker_slots_busy", "gauge", "Warm slots holding a process.", ("slots_busy",)),
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _lookup(entry: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        entry = entry.get(key, {}) if isinstance(entry, dict) else {}
    return entry if isinstance(entry, (int, float)) else None


def render(status: dict[str, Any]) -> str:
    """Return the status as Prometheus text format version 0.0.4."""
    lines: list[str] = []
    users = status.get("users", {})
    for name, kind, help_text, path in USER_METRICS:
        lines.extend(_family(name, kind, help_text, _user_samples(users, path)))
    daemon = status.get("daemon", {})
    lines.extend(
        _family(
            "broker_events_total",
            "counter",
            "Ring-buffer events handled.",
            [("", daemon.get("events", 0))],
        )
    )
    lines.extend(
        _family(
            "broker_ringbuf_drops_all_total",
            "counter",
            "Accept events lost, all users.",
            [("", daemon.get("ring_buffer_drops", 0))],
        )
    )
    latency = status.get("latency_us", {})
    for quantile, key in (("0.5", "median"), ("0.99", "p99")):
        if latency.get(key) is not None:
            lines.append(
                f'broker_accept_to_move_seconds{{quantile="{quantile}"}} {latency[key] / 1e6:.9f}'
            )
    return "\n".join(lines) + "\n"


def _user_samples(
    users: dict[str, Any], path: tuple[str, ...]
) -> list[tuple[str, float]]:
    samples = []
    for uid, entry in users.items():
        value = _lookup(entry, path)
        if value is not None:
            labels = f'uid="{uid}",user="{_escape(entry.get("name") or "")}"'
            samples.append((labels, value))
    return samples


def _family(
    name: str, kind: str, help_text: str, samples: Iterable[tuple[str, float]]
) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        lines.append(f"{name}{{{labels}}} {value}" if labels else f"{name} {value}")
    return lines
