"""Placements and status that survive a daemon restart.

The state directory (default /run/broker, mode 0700) holds:
- state.json: every process the broker moved, with its slot and home, so a
  restarted daemon re-adopts them and a stop can send each one home;
- status.json: what `broker status` prints, rewritten every tick;
- metrics.prom: the same numbers in Prometheus text format, for the
  node_exporter textfile collector.
Files are replaced atomically (write to a temporary file, then rename).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path("/run/broker")
STATE_FILE = "state.json"
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.prom"
STATE_VERSION = 1


@dataclass
class Placement:
    """A process the broker moved into a warm slot."""

    tgid: int
    uid: int
    slot: str  # cgroup path of the slot
    home: str  # cgroup path the process came from
    accept_ns: int  # kernel CLOCK_MONOTONIC time of the activating accept
    moved_ns: int  # CLOCK_MONOTONIC time when the move returned
    last_accept: float  # CLOCK_MONOTONIC seconds of the latest accept


def state_dir(override: str | None = None) -> Path:
    if override:
        return Path(override)
    return Path(os.environ.get("BROKER_STATE_DIR", str(DEFAULT_STATE_DIR)))


def ensure_dir(directory: Path) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)


def write_atomic(path: Path, text: str, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def save_placements(directory: Path, placements: list[Placement]) -> None:
    data = {"version": STATE_VERSION, "placements": [asdict(p) for p in placements]}
    write_atomic(directory / STATE_FILE, json.dumps(data, indent=1))


def load_placements(directory: Path) -> list[Placement]:
    """Return saved placements; an unreadable file is logged and treated as empty."""
    path = directory / STATE_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable state file %s: %s", path, exc)
        return []
    if data.get("version") != STATE_VERSION:
        log.warning("ignoring state file %s of version %s", path, data.get("version"))
        return []
    placements = []
    for entry in data.get("placements", []):
        try:
            placements.append(Placement(**entry))
        except TypeError as exc:
            log.warning("ignoring malformed placement %s: %s", entry, exc)
    return placements


def _plain(value: Any) -> Any:
    """Convert numpy scalars, which json cannot encode, to Python numbers."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def save_status(directory: Path, status: dict[str, Any]) -> None:
    text = json.dumps(status, indent=1, sort_keys=True, default=_plain)
    write_atomic(directory / STATUS_FILE, text)


def load_status(directory: Path) -> dict[str, Any]:
    return json.loads((directory / STATUS_FILE).read_text())
