"""Make the broker's cgroup subtree match the desired pools.

Layout under the delegated root (broker-slots.service's cgroup under systemd):

    ROOT/holder                      leaf for the processes that were in ROOT
    ROOT/users/uid-UID/TIER-N        one leaf per warm slot

ROOT must not contain processes once controllers are enabled for its
children, so prepare() moves whatever runs in ROOT into the holder leaf.
That is the placeholder process of broker-slots.service, or the daemon
itself when it runs in its own delegated scope (`broker run --cgroup-root
self`).
release_root() undoes this on a clean stop, so the unit can start again.

Interior cgroups never hold processes, so controllers can be enabled on
them, and every slot is a leaf, so processes can be moved in. memory.min and
memory.low of each interior cgroup are kept at the sum of its children,
because a child's protection is capped by what its ancestors carry
(Documentation/admin-guide/cgroup-v2.rst, "memory.min").

apply() is idempotent: it reads what exists, creates what is missing,
rewrites knobs whose read-back differs, and removes free slots that are no
longer wanted. Busy slots that are no longer wanted are removed when their
process leaves.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from broker.cgroups import (
    IO_WEIGHT,
    MEMORY_LOW,
    MEMORY_MIN,
    CgroupFS,
    join,
)
from broker.errors import CgroupError
from broker.policy import Tier

log = logging.getLogger(__name__)

HOLDER_LEAF = "holder"
USERS_DIR = "users"
BASE_CONTROLLERS = {"cpu", "memory"}
_SLOT_NAME = re.compile(r"^(?P<tier>[A-Za-z0-9_.-]+)-(?P<index>\d+)$")
_USER_DIR = re.compile(r"^uid-(?P<uid>\d+)$")

# Values that mean "no reservation" for knobs a tier leaves unset.
KNOB_DEFAULTS = {
    "memory.low": "0",
    "memory.high": "max",
    "cpu.max": "max 100000",
}


@dataclass
class Slot:
    """A warm slot: one leaf cgroup with a tier's reservations."""

    uid: int
    tier: str
    index: int
    path: str
    tgid: int | None = None  # the placed process, None when free
    retiring: bool = False  # remove when it becomes free
    knobs: dict[str, str] = field(default_factory=dict)  # last written and verified

    @property
    def busy(self) -> bool:
        return self.tgid is not None


@dataclass
class PoolTable:
    """All slots by uid, with a quick free-slot lookup for the event path."""

    slots: dict[int, list[Slot]] = field(default_factory=dict)

    def free_slot(self, uid: int) -> Slot | None:
        for slot in self.slots.get(uid, ()):
            if not slot.busy and not slot.retiring:
                return slot
        return None

    def by_path(self, path: str, uid: int | None = None) -> Slot | None:
        """Return the slot at path; with uid, only that user's slots are searched."""
        groups = [self.slots.get(uid, [])] if uid is not None else self.slots.values()
        for slots in groups:
            for slot in slots:
                if slot.path == path:
                    return slot
        return None

    def all(self) -> list[Slot]:
        return [slot for slots in self.slots.values() for slot in slots]


def tier_knobs(tier: Tier, available: set[str]) -> dict[str, str]:
    """Return every knob a slot of this tier should carry, defaults included."""
    knobs = dict(KNOB_DEFAULTS)
    knobs.update(tier.knobs())
    if "io" not in available:
        knobs.pop(IO_WEIGHT, None)
    return knobs


class Reconciler:
    """Owns the broker's cgroup subtree below root."""

    def __init__(self, cg: CgroupFS, root: str, dry_run: bool = False):
        self.cg = cg
        self.root = root
        self.users_dir = join(root, USERS_DIR)
        self.holder_leaf = join(root, HOLDER_LEAF)
        self.dry_run = dry_run
        self.pools = PoolTable()
        self.controllers: set[str] = set(BASE_CONTROLLERS)
        self._verify = True

    # -- setup -----------------------------------------------------------------

    def prepare(self, want_io: bool) -> None:
        """Create the holder leaf and users dir, and enable controllers top-down."""
        available = self.cg.controllers(self.root)
        if want_io and "io" in available:
            self.controllers.add("io")
        self.cg.mkdir(self.holder_leaf)
        for pid in self.cg.procs(self.root):
            outcome = self.cg.move(pid, self.holder_leaf)
            log.info(
                "moved pid %d from %s to %s: %s",
                pid,
                self.root,
                self.holder_leaf,
                outcome.value,
            )
        self.cg.mkdir(self.users_dir)
        self.cg.enable_controllers(self.root, self.controllers)
        self.cg.enable_controllers(self.users_dir, self.controllers)

    def adopt_existing(self) -> None:
        """Register slots left by a previous run, busy or not."""
        for user_name in self.cg.children(self.users_dir):
            user_match = _USER_DIR.match(user_name)
            if not user_match:
                continue
            uid = int(user_match.group("uid"))
            user_path = join(self.users_dir, user_name)
            for slot_name in self.cg.children(user_path):
                slot_match = _SLOT_NAME.match(slot_name)
                if slot_match:
                    slot = Slot(
                        uid,
                        slot_match.group("tier"),
                        int(slot_match.group("index")),
                        join(user_path, slot_name),
                    )
                    self.pools.slots.setdefault(uid, []).append(slot)

    # -- apply -----------------------------------------------------------------

    def apply(
        self,
        desired: dict[int, dict[str, int]],
        tiers: dict[str, Tier],
        overrides: dict[int, dict[str, dict[str, str]]] | None = None,
        verify: bool = True,
    ) -> dict[str, int]:
        """Make slots match desired[uid][tier] = count; return counts of changes.

        overrides[uid][tier] replaces some of the tier's knobs for that user's
        slots (the planner's memory.min and cpu.weight). With verify=False,
        knobs already written and verified are not read back again.
        """
        changes = {"created": 0, "removed": 0, "retiring": 0}
        self._verify = verify
        overrides = overrides or {}
        for uid, pool in desired.items():
            self._apply_user(uid, pool, tiers, changes, overrides.get(uid, {}))
        for uid in list(self.pools.slots):
            if uid not in desired:
                self._apply_user(uid, {}, tiers, changes, {})
        self._write_users_sums()
        return changes

    def _apply_user(
        self,
        uid: int,
        pool: dict[str, int],
        tiers: dict[str, Tier],
        changes: dict[str, int],
        overrides: dict[str, dict[str, str]],
    ) -> None:
        user_path = join(self.users_dir, f"uid-{uid}")
        slots = self.pools.slots.setdefault(uid, [])
        if pool and not self.dry_run:
            self.cg.mkdir(user_path)
            self.cg.enable_controllers(user_path, self.controllers)
        for tier_name, count in pool.items():
            knobs = tier_knobs(tiers[tier_name], self.controllers)
            knobs.update(overrides.get(tier_name, {}))
            for index in range(count):
                self._ensure_slot(uid, tier_name, index, knobs, slots, changes)
        for slot in list(slots):
            wanted = pool.get(slot.tier, 0) > slot.index and slot.tier in tiers
            if wanted:
                slot.retiring = False
                continue
            self._retire(slot, slots, changes)
        self._settle_user(uid)

    def _ensure_slot(
        self,
        uid: int,
        tier_name: str,
        index: int,
        knobs: dict[str, str],
        slots: list[Slot],
        changes: dict[str, int],
    ) -> None:
        path = join(join(self.users_dir, f"uid-{uid}"), f"{tier_name}-{index}")
        slot = next((s for s in slots if s.path == path), None)
        if slot is None:
            slot = Slot(uid, tier_name, index, path)
            slots.append(slot)
            changes["created"] += 1
            log.info("creating slot %s (tier %s) for uid %d", path, tier_name, uid)
        if self.dry_run:
            log.info("dry run: would write %s to %s", knobs, path)
            return
        if not self._verify and slot.knobs == knobs:
            return
        self.cg.mkdir(path)
        for knob, value in knobs.items():
            self.cg.write_checked(path, knob, value)
        slot.knobs = dict(knobs)

    def _retire(self, slot: Slot, slots: list[Slot], changes: dict[str, int]) -> None:
        if slot.busy:
            if not slot.retiring:
                log.info(
                    "slot %s is no longer wanted; removing it once its process leaves",
                    slot.path,
                )
                changes["retiring"] += 1
            slot.retiring = True
            return
        slots.remove(slot)
        changes["removed"] += 1
        if self.dry_run:
            log.info("dry run: would remove slot %s", slot.path)
            return
        self.cg.rmdir(slot.path)
        log.info("removed slot %s", slot.path)

    def release(self, slot: Slot) -> None:
        """Mark a slot free after its process left; remove it if it was retiring."""
        slot.tgid = None
        if not slot.retiring:
            return
        slots = self.pools.slots.get(slot.uid, [])
        self._retire(slot, slots, {"created": 0, "removed": 0, "retiring": 0})
        self._settle_user(slot.uid)
        self._write_users_sums()

    def _settle_user(self, uid: int) -> None:
        """Remove a user's cgroup once it has no slot, else rewrite its sums."""
        user_path = join(self.users_dir, f"uid-{uid}")
        slots = self.pools.slots.get(uid, [])
        if slots:
            self._write_sums(user_path, [s.path for s in slots])
            return
        self.pools.slots.pop(uid, None)
        if not self.dry_run and self.cg.exists(user_path):
            self.cg.rmdir(user_path)

    def _write_users_sums(self) -> None:
        """Set the users directory's memory.min and memory.low to the sum of all users'."""
        users = [join(self.users_dir, f"uid-{u}") for u in self.pools.slots]
        self._write_sums(self.users_dir, users)

    def _write_sums(self, parent: str, children: list[str]) -> None:
        """Set the parent's memory.min and memory.low to the sum of its children's."""
        if self.dry_run or not self.cg.exists(parent):
            return
        for knob in (MEMORY_MIN, MEMORY_LOW):
            total = 0
            for child in children:
                if self.cg.exists(child):
                    total += int(self.cg.read(child, knob).strip())
            self.cg.write_checked(parent, knob, str(total))

    # -- teardown --------------------------------------------------------------

    def release_root(self) -> None:
        """Disable controllers in root and move the holder's processes back into it.

        A unit whose cgroup has controllers enabled for its children cannot
        start a process in it again (the kernel's no-internal-process rule),
        so a clean stop leaves root as systemd created it.
        """
        if self.cg.children(self.users_dir):
            log.warning(
                "not releasing %s: slots remain under %s", self.root, self.users_dir
            )
            return
        if self.cg.exists(self.users_dir):
            self.cg.rmdir(self.users_dir)
        enabled = self.cg.subtree_control(self.root)
        if enabled:
            self.cg.write(
                self.root,
                "cgroup.subtree_control",
                " ".join(f"-{c}" for c in sorted(enabled)),
            )
        for pid in self.cg.procs(self.holder_leaf):
            self.cg.move(pid, self.root)
        self.cg.rmdir(self.holder_leaf)

    def remove_all(self) -> list[str]:
        """Remove every slot and user dir; return the paths that could not be removed."""
        failed = []
        for slot in self.pools.all():
            try:
                self.cg.rmdir(slot.path)
            except CgroupError as exc:
                failed.append(slot.path)
                log.error("%s", exc)
        self.pools = PoolTable()
        for user_name in self.cg.children(self.users_dir):
            path = join(self.users_dir, user_name)
            for leftover in self.cg.children(path):
                try:
                    self.cg.rmdir(join(path, leftover))
                except CgroupError as exc:
                    failed.append(join(path, leftover))
                    log.error("%s", exc)
            try:
                self.cg.rmdir(path)
            except CgroupError as exc:
                failed.append(path)
                log.error("%s", exc)
        return failed
