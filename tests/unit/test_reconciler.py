"""Pool planning of the reconciler on a fake cgroup tree with the real file names.

The kernel behaviour itself (writes, moves, EBUSY) is tested in the VM; this
checks which slots the reconciler creates, keeps and removes.
"""

from pathlib import Path

import pytest

from broker.cgroups import CgroupFS
from broker.policy import Tier
from broker.reconciler import Reconciler

DEFAULT_FILES = {
    "cgroup.controllers": "cpu memory io",
    "cgroup.subtree_control": "",
    "cgroup.procs": "",
    "cgroup.events": "populated 0\nfrozen 0\n",
    "cgroup.type": "domain",
    "cpu.weight": "100",
    "cpu.max": "max 100000",
    "memory.min": "0",
    "memory.low": "0",
    "memory.high": "max",
    "io.weight": "default 100",
}


class FakeCgroupFS(CgroupFS):
    """A directory tree that mimics cgroupfs: new cgroups get default files."""

    def __init__(self, mount: Path):
        super().__init__(mount)
        self.writes: list[tuple[str, str, str]] = []
        self._populate(mount)

    def _populate(self, path: Path) -> None:
        for name, text in DEFAULT_FILES.items():
            (path / name).write_text(text)

    def mkdir(self, cgroup: str) -> bool:
        created = super().mkdir(cgroup)
        if created:
            self._populate(self.fs_path(cgroup))
        return created

    def write(self, cgroup: str, filename: str, text: str) -> None:
        self.writes.append((cgroup, filename, text))
        path = self.fs_path(cgroup, filename)
        if filename == "cgroup.subtree_control":
            current = set(path.read_text().split())
            for token in text.split():
                (current.add if token[0] == "+" else current.discard)(token[1:])
            text = " ".join(sorted(current))
        elif filename == "io.weight":
            text = f"default {text}"
        path.write_text(text)

    def rmdir(self, cgroup: str, timeout: float = 2.0) -> bool:
        path = self.fs_path(cgroup)
        if not path.exists():
            return False
        for child in path.iterdir():
            child.unlink()
        path.rmdir()
        return True


TIERS = {
    "light": Tier("light", cpu_weight=200, memory_min=1 << 20),
    "heavy": Tier("heavy", cpu_weight=800, memory_min=4 << 20, memory_low=8 << 20),
}


@pytest.fixture
def reconciler(tmp_path):
    fs = FakeCgroupFS(tmp_path)
    fs.mkdir("/broker")
    rec = Reconciler(fs, "/broker")
    rec.prepare(want_io=False)
    return rec


def slot_names(rec: Reconciler, uid: int) -> list[str]:
    return rec.cg.children(f"/broker/users/uid-{uid}")


def test_creates_slots_per_tier(reconciler):
    reconciler.apply({1001: {"light": 2, "heavy": 1}}, TIERS)
    assert slot_names(reconciler, 1001) == ["heavy-0", "light-0", "light-1"]


def test_writes_tier_knobs(reconciler):
    reconciler.apply({1001: {"heavy": 1}}, TIERS)
    slot = "/broker/users/uid-1001/heavy-0"
    assert reconciler.cg.read(slot, "cpu.weight") == "800"
    assert reconciler.cg.read(slot, "memory.low") == str(8 << 20)


def test_parent_sums(reconciler):
    reconciler.apply({1001: {"light": 2, "heavy": 1}, 1002: {"light": 1}}, TIERS)
    assert reconciler.cg.read("/broker/users/uid-1001", "memory.min") == str(6 << 20)
    assert reconciler.cg.read("/broker/users", "memory.min") == str(7 << 20)


def test_second_apply_writes_nothing(reconciler):
    reconciler.apply({1001: {"light": 2}}, TIERS)
    before = len(reconciler.cg.writes)
    changes = reconciler.apply({1001: {"light": 2}}, TIERS)
    assert changes == {"created": 0, "removed": 0, "retiring": 0}
    assert len(reconciler.cg.writes) == before


def test_shrink_removes_free_slots(reconciler):
    reconciler.apply({1001: {"light": 3}}, TIERS)
    reconciler.apply({1001: {"light": 1}}, TIERS)
    assert slot_names(reconciler, 1001) == ["light-0"]


def test_shrink_keeps_busy_slot_until_released(reconciler):
    reconciler.apply({1001: {"light": 2}}, TIERS)
    busy = reconciler.pools.by_path("/broker/users/uid-1001/light-1")
    busy.tgid = 4242
    reconciler.apply({1001: {"light": 1}}, TIERS)
    assert slot_names(reconciler, 1001) == ["light-0", "light-1"]
    assert busy.retiring
    reconciler.release(busy)
    assert slot_names(reconciler, 1001) == ["light-0"]


def test_removed_user_loses_directory(reconciler):
    reconciler.apply({1001: {"light": 1}, 1002: {"light": 1}}, TIERS)
    reconciler.apply({1002: {"light": 1}}, TIERS)
    assert reconciler.cg.children("/broker/users") == ["uid-1002"]


def test_release_updates_parent_sums(reconciler):
    reconciler.apply({1001: {"light": 1, "heavy": 1}}, TIERS)
    busy = reconciler.pools.by_path("/broker/users/uid-1001/heavy-0")
    busy.tgid = 4242
    reconciler.apply({1001: {"light": 1}}, TIERS)
    reconciler.release(busy)
    # Only light-0 (1 MiB) is left, in the user and in the sum over users.
    assert reconciler.cg.read("/broker/users/uid-1001", "memory.min") == str(1 << 20)
    assert reconciler.cg.read("/broker/users", "memory.min") == str(1 << 20)


def test_release_last_slot_removes_user(reconciler):
    reconciler.apply({1001: {"light": 1}, 1002: {"light": 1}}, TIERS)
    busy = reconciler.pools.by_path("/broker/users/uid-1001/light-0")
    busy.tgid = 4242
    reconciler.apply({1002: {"light": 1}}, TIERS)
    assert reconciler.cg.children("/broker/users") == ["uid-1001", "uid-1002"]
    reconciler.release(busy)
    assert reconciler.cg.children("/broker/users") == ["uid-1002"]
    assert reconciler.cg.read("/broker/users", "memory.min") == str(1 << 20)


def test_free_slot_skips_busy_and_retiring(reconciler):
    reconciler.apply({1001: {"light": 2}}, TIERS)
    first, second = reconciler.pools.slots[1001]
    first.tgid = 1
    assert reconciler.pools.free_slot(1001) is second
    second.retiring = True
    assert reconciler.pools.free_slot(1001) is None


def test_tier_change_rewrites_in_place(reconciler):
    reconciler.apply({1001: {"light": 1}}, TIERS)
    heavier = dict(TIERS, light=Tier("light", cpu_weight=300, memory_min=1 << 20))
    reconciler.apply({1001: {"light": 1}}, heavier)
    assert reconciler.cg.read("/broker/users/uid-1001/light-0", "cpu.weight") == "300"


def test_adopt_existing_finds_slots(reconciler, tmp_path):
    reconciler.apply({1001: {"light": 2}}, TIERS)
    fresh = Reconciler(reconciler.cg, "/broker")
    fresh.adopt_existing()
    assert sorted(s.path for s in fresh.pools.all()) == [
        "/broker/users/uid-1001/light-0",
        "/broker/users/uid-1001/light-1",
    ]


def test_dry_run_writes_nothing(tmp_path):
    fs = FakeCgroupFS(tmp_path)
    fs.mkdir("/broker")
    rec = Reconciler(fs, "/broker", dry_run=True)
    rec.apply({1001: {"light": 1}}, TIERS)
    assert fs.writes == []
    assert not (tmp_path / "broker" / "users").exists()
