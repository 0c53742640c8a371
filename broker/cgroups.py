"""The one gateway to cgroupfs (cgroup v2).

Every read and write of a cgroup file in the project goes through CgroupFS.
Paths are cgroup paths as /proc/PID/cgroup prints them ("/system.slice/x"),
relative to the cgroup2 mount. OSError is translated here into CgroupError
with the operation, the path, the errno text and the usual fix.

Kernel rules this module enforces before the kernel has to reject a write
(Documentation/admin-guide/cgroup-v2.rst, "No Internal Process Constraint"
and "Enabling and Disabling"):
- controllers are enabled top-down, never on a populated cgroup (EBUSY);
- a process can only be moved into a cgroup that has no controllers enabled
  for its children (a leaf), except the root.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from broker.errors import CgroupError, ControllerMissingError, hint_for

log = logging.getLogger(__name__)

CGROUP_MOUNT = Path("/sys/fs/cgroup")

CGROUP_PROCS = "cgroup.procs"
CGROUP_EVENTS = "cgroup.events"
CGROUP_CONTROLLERS = "cgroup.controllers"
CGROUP_SUBTREE_CONTROL = "cgroup.subtree_control"
CGROUP_TYPE = "cgroup.type"
CPU_WEIGHT = "cpu.weight"
CPU_MAX = "cpu.max"
CPU_STAT = "cpu.stat"
CPU_PRESSURE = "cpu.pressure"
MEMORY_MIN = "memory.min"
MEMORY_LOW = "memory.low"
MEMORY_HIGH = "memory.high"
MEMORY_CURRENT = "memory.current"
MEMORY_PEAK = "memory.peak"
MEMORY_PRESSURE = "memory.pressure"
IO_WEIGHT = "io.weight"

# Kernel task flag of kernel threads (include/linux/sched.h).
PF_KTHREAD = 0x00200000


class MoveOutcome(Enum):
    """Result of handing one pid to CgroupFS.move()."""

    MOVED = "moved"
    GONE = "gone"  # exited before the write (ESRCH)
    ZOMBIE = "zombie"  # exited, not yet reaped: nothing left to move
    KERNEL_THREAD = "kernel_thread"  # kernel threads cannot be moved
    NOT_LEAF = "not_leaf"  # EBUSY: the target has controllers enabled below it
    TARGET_MISSING = "target_missing"  # the target cgroup no longer exists
    DENIED = "denied"  # EPERM/EACCES/EINVAL from the kernel


@dataclass(frozen=True)
class ProcessInfo:
    """State letter and flags of a process, from /proc/PID/stat."""

    state: str
    flags: int

    @property
    def is_zombie(self) -> bool:
        return self.state in ("Z", "X")

    @property
    def is_kernel_thread(self) -> bool:
        return bool(self.flags & PF_KTHREAD)


def parse_proc_stat(text: str) -> ProcessInfo:
    """Parse /proc/PID/stat; the command name may contain spaces and parentheses."""
    after_name = text[text.rindex(")") + 2 :].split()
    # Fields after the name: state is field 3, flags field 9 (proc(5)).
    return ProcessInfo(state=after_name[0], flags=int(after_name[6]))


def parse_proc_cgroup(text: str) -> str | None:
    """Return the cgroup v2 path from /proc/PID/cgroup text, or None if absent."""
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            return path
    return None


def parse_flat_keyed(text: str) -> dict[str, str]:
    """Parse "key value" lines (cgroup.events, cpu.stat, memory.stat)."""
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key:
            out[key] = value.strip()
    return out


def join(parent: str, name: str) -> str:
    """Join cgroup paths the way /proc/PID/cgroup prints them."""
    return parent.rstrip("/") + "/" + name


def parent_of(path: str) -> str:
    head = path.rstrip("/").rpartition("/")[0]
    return head or "/"


class CgroupFS:
    """Reads and writes cgroup v2 files under one mount point."""

    def __init__(self, mount: Path = CGROUP_MOUNT):
        self.mount = Path(mount)

    # -- paths and raw I/O ------------------------------------------------

    def fs_path(self, cgroup: str, filename: str | None = None) -> Path:
        path = self.mount / cgroup.lstrip("/")
        return path / filename if filename else path

    def exists(self, cgroup: str) -> bool:
        return self.fs_path(cgroup).is_dir()

    def read(self, cgroup: str, filename: str) -> str:
        path = self.fs_path(cgroup, filename)
        try:
            return path.read_text()
        except OSError as exc:
            raise CgroupError(
                "read", str(path), exc.errno or errno.EIO, hint_for(exc.errno or 0)
            ) from exc

    def write(self, cgroup: str, filename: str, text: str) -> None:
        """Write one value with a single write(2), as cgroupfs expects."""
        path = self.fs_path(cgroup, filename)
        try:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
        except OSError as exc:
            err = exc.errno or errno.EIO
            raise CgroupError(
                f"write {text!r} to", str(path), err, hint_for(err)
            ) from exc

    def write_checked(self, cgroup: str, filename: str, text: str) -> str:
        """Write a control file and read it back; raise if the kernel kept another value."""
        old = self.read(cgroup, filename).strip()
        if not _same_value(filename, old, text):
            self.write(cgroup, filename, text)
        new = self.read(cgroup, filename).strip()
        if not _same_value(filename, new, text):
            raise CgroupError(
                f"verify {filename}={text!r} (read back {new!r}) in",
                str(self.fs_path(cgroup)),
                errno.EIO,
                "another writer may be changing it",
            )
        if old != new:
            log.info("set %s %s: %s -> %s", cgroup, filename, old, new)
        return new

    # -- tree ---------------------------------------------------------------

    def mkdir(self, cgroup: str) -> bool:
        """Create a cgroup; return False if it already existed."""
        path = self.fs_path(cgroup)
        try:
            path.mkdir()
        except FileExistsError:
            return False
        except OSError as exc:
            err = exc.errno or errno.EIO
            raise CgroupError("create cgroup", str(path), err, hint_for(err)) from exc
        log.debug("created cgroup %s", cgroup)
        return True

    def children(self, cgroup: str) -> list[str]:
        path = self.fs_path(cgroup)
        try:
            return sorted(entry.name for entry in path.iterdir() if entry.is_dir())
        except FileNotFoundError:
            return []

    def rmdir(self, cgroup: str, timeout: float = 2.0) -> bool:
        """Remove an empty cgroup; return False if it was already gone.

        Right after its last process left, rmdir can still fail with EBUSY
        while the kernel finishes the exiting task, so wait (bounded) for
        "populated 0" in cgroup.events and retry.
        """
        path = self.fs_path(cgroup)
        deadline = time.monotonic() + timeout
        while True:
            try:
                path.rmdir()
                log.debug("removed cgroup %s", cgroup)
                return True
            except FileNotFoundError:
                return False
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                    err = exc.errno or errno.EIO
                    pids = self.procs(cgroup) if err == errno.EBUSY else []
                    hint = f"still holds pids {pids}" if pids else hint_for(err)
                    raise CgroupError("remove cgroup", str(path), err, hint) from exc
                self.wait_unpopulated(cgroup, deadline - time.monotonic())

    def wait_unpopulated(self, cgroup: str, timeout: float) -> bool:
        deadline = time.monotonic() + max(timeout, 0)
        while True:
            try:
                populated = self.events(cgroup).get("populated", "0") != "0"
            except CgroupError:
                return True
            if not populated:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    def events(self, cgroup: str) -> dict[str, str]:
        return parse_flat_keyed(self.read(cgroup, CGROUP_EVENTS))

    def procs(self, cgroup: str) -> list[int]:
        try:
            text = self.read(cgroup, CGROUP_PROCS)
        except CgroupError as exc:
            if exc.errno == errno.ENOENT:
                return []
            raise
        return [int(line) for line in text.split()]

    # -- controllers ----------------------------------------------------------

    def controllers(self, cgroup: str) -> set[str]:
        return set(self.read(cgroup, CGROUP_CONTROLLERS).split())

    def subtree_control(self, cgroup: str) -> set[str]:
        return set(self.read(cgroup, CGROUP_SUBTREE_CONTROL).split())

    def enable_controllers(self, cgroup: str, wanted: set[str]) -> None:
        """Enable controllers for cgroup's children.

        Raises ControllerMissingError naming the level that lacks one, and
        CgroupError naming the pids if cgroup itself contains processes (the
        kernel would reject the write with EBUSY).
        """
        missing = wanted - self.subtree_control(cgroup)
        if not missing:
            return
        lacking = missing - self.controllers(cgroup)
        if lacking:
            raise ControllerMissingError(
                sorted(lacking)[0], self.first_level_lacking(cgroup, sorted(lacking)[0])
            )
        pids = self.procs(cgroup) if cgroup != "/" else []
        if pids:
            raise CgroupError(
                "enable controllers in",
                str(self.fs_path(cgroup)),
                errno.EBUSY,
                f"it holds processes {pids[:10]}; a cgroup with processes cannot "
                f"enable controllers for children: move them into a leaf first",
            )
        self.write(
            cgroup, CGROUP_SUBTREE_CONTROL, " ".join(f"+{c}" for c in sorted(missing))
        )
        self._check_domain(cgroup)
        log.info("enabled controllers %s in %s", " ".join(sorted(missing)), cgroup)

    def first_level_lacking(self, cgroup: str, controller: str) -> str:
        """Return the highest ancestor of cgroup (or cgroup) whose cgroup.controllers lacks it."""
        levels = []
        path = cgroup
        while True:
            levels.append(path)
            if path == "/":
                break
            path = parent_of(path)
        for level in reversed(levels):
            if controller not in self.controllers(level):
                return str(self.fs_path(level))
        return str(self.fs_path(cgroup))

    def _check_domain(self, cgroup: str) -> None:
        if cgroup == "/":
            return
        kind = self.read(cgroup, CGROUP_TYPE).strip()
        if kind == "domain invalid":
            raise CgroupError(
                "check cgroup.type of",
                str(self.fs_path(cgroup)),
                errno.EINVAL,
                "it became 'domain invalid' after a subtree_control change; "
                "a threaded child is mixed with domain controllers",
            )

    # -- processes ------------------------------------------------------------

    def cgroup_of(self, pid: int) -> str | None:
        """Return pid's cgroup v2 path, or None if the process is gone."""
        try:
            return parse_proc_cgroup(Path(f"/proc/{pid}/cgroup").read_text())
        except (FileNotFoundError, ProcessLookupError):
            return None

    def process_info(self, pid: int) -> ProcessInfo | None:
        try:
            return parse_proc_stat(Path(f"/proc/{pid}/stat").read_text())
        except (FileNotFoundError, ProcessLookupError):
            return None

    def move(self, pid: int, cgroup: str) -> MoveOutcome:
        """Move a whole process (all its threads) into cgroup with one write."""
        path = self.fs_path(cgroup, CGROUP_PROCS)
        try:
            fd = os.open(path, os.O_WRONLY)
        except FileNotFoundError:
            return MoveOutcome.TARGET_MISSING
        except OSError as exc:
            raise CgroupError(
                "open", str(path), exc.errno or errno.EIO, hint_for(exc.errno or 0)
            ) from exc
        try:
            os.write(fd, str(pid).encode())
            return MoveOutcome.MOVED
        except OSError as exc:
            return _classify_move_error(exc.errno or errno.EIO)
        finally:
            os.close(fd)

    def classify(self, pid: int) -> MoveOutcome | None:
        """Return why pid cannot be moved (gone, zombie, kernel thread), or None."""
        info = self.process_info(pid)
        if info is None:
            return MoveOutcome.GONE
        if info.is_zombie:
            return MoveOutcome.ZOMBIE
        if info.is_kernel_thread:
            return MoveOutcome.KERNEL_THREAD
        return None

    def accepts_processes(self, cgroup: str) -> bool:
        """Return True if a process can be moved into cgroup (a leaf, or the root)."""
        if cgroup == "/":
            return True
        try:
            return not self.subtree_control(cgroup)
        except CgroupError:
            return False

    def mount_options(self) -> set[str]:
        """Return the cgroup2 mount's options, e.g. nsdelegate, favordynmods."""
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            fields = left.split()
            if (
                len(fields) > 4
                and fields[4] == str(self.mount)
                and right.startswith("cgroup2 ")
            ):
                options = set(fields[5].split(","))
                options.update(right.split()[2].split(","))
                return options
        return set()


def _classify_move_error(err: int) -> MoveOutcome:
    if err == errno.ESRCH:
        return MoveOutcome.GONE
    if err == errno.EBUSY or err == errno.EOPNOTSUPP:
        return MoveOutcome.NOT_LEAF
    if err == errno.ENOENT or err == errno.ENODEV:
        return MoveOutcome.TARGET_MISSING
    return MoveOutcome.DENIED


def _same_value(filename: str, read_back: str, written: str) -> bool:
    """Compare a read-back with what was written, in the file's own format."""
    if filename == CPU_MAX:
        # The kernel prints "max 100000" for "max 100000" and normalises spacing.
        return read_back.split() == written.split()
    if filename == IO_WEIGHT:
        # io.weight reads back as "default N" followed by per-device lines.
        first = read_back.splitlines()[0].split() if read_back else []
        return first[-1:] == written.split()[-1:]
    if filename in (MEMORY_MIN, MEMORY_LOW, MEMORY_HIGH):
        # Memory values are rounded down to whole pages by the kernel.
        if read_back == "max" or written == "max":
            return read_back == written
        page = os.sysconf("SC_PAGE_SIZE")
        return int(read_back) == int(written) // page * page
    return read_back == written
