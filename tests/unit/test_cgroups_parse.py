"""Pure parsers of /proc and cgroup files, on fixture text."""

from broker.cgroups import (
    PF_KTHREAD,
    _same_value,
    parse_flat_keyed,
    parse_proc_cgroup,
    parse_proc_stat,
)

STAT_SLEEP = (
    "1234 (sleep) S 1 1234 1234 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 5 1 1 0"
)
STAT_ODD_NAME = "77 (a) b (c) Z 1 77 77 0 -1 4194564 0 0 0 0 0 0 0 0 20 0 1 0 5 0 0 0"
STAT_KTHREADD = "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0 2 0 0 0"


def test_proc_stat_state_and_flags():
    info = parse_proc_stat(STAT_SLEEP)
    assert info.state == "S"
    assert info.flags == 4194560
    assert not info.is_zombie
    assert not info.is_kernel_thread


def test_proc_stat_name_with_parentheses():
    info = parse_proc_stat(STAT_ODD_NAME)
    assert info.state == "Z"
    assert info.is_zombie


def test_proc_stat_kernel_thread():
    info = parse_proc_stat(STAT_KTHREADD)
    assert info.flags & PF_KTHREAD
    assert info.is_kernel_thread


def test_proc_cgroup_v2_line():
    text = "0::/user.slice/user-1000.slice/session-3.scope\n"
    assert parse_proc_cgroup(text) == "/user.slice/user-1000.slice/session-3.scope"


def test_proc_cgroup_hybrid_picks_unified():
    text = "12:memory:/user.slice\n1:name=systemd:/user.slice/x.scope\n0::/user.slice/x.scope\n"
    assert parse_proc_cgroup(text) == "/user.slice/x.scope"


def test_proc_cgroup_v1_only():
    assert parse_proc_cgroup("4:cpu,cpuacct:/\n1:name=systemd:/init.scope\n") is None


def test_flat_keyed_events():
    assert parse_flat_keyed("populated 1\nfrozen 0\n") == {
        "populated": "1",
        "frozen": "0",
    }


def test_same_value_cpu_max_spacing():
    assert _same_value("cpu.max", "max 100000", "max  100000")


def test_same_value_memory_rounds_to_pages():
    assert _same_value("memory.min", "4096", "4100")
    assert not _same_value("memory.min", "8192", "4100")


def test_same_value_io_weight_default_line():
    assert _same_value("io.weight", "default 200\n8:0 50", "200")
    assert not _same_value("io.weight", "default 100", "200")
