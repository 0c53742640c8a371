"""Policy loading: every problem names file, line, field and fix."""

import pytest

from broker import policy
from broker.errors import PolicyError

GOOD = """\
idle_timeout: 20s
tiers:
  light:
    cpu.weight: 200
    memory.min: 0
  heavy:
    cpu.weight: 800
    memory.min: 128M
    memory.low: 256M
    memory.high: 1G
    cpu.max: "50000 100000"
users:
  - name: alice
    pool: {light: 2, heavy: 1}
  - uid: 1002
    pool: {light: 1}
    idle_timeout: 5s
  - uids: 2000-2999
    pool: {light: 1}
  - group: devs
    pool: {heavy: 1}
"""


def problems_of(text: str, path: str = "p.yaml") -> list[str]:
    with pytest.raises(PolicyError) as caught:
        policy.load_texts([(path, text)])
    return [str(p) for p in caught.value.problems]


def test_good_policy_loads():
    loaded = policy.load_texts([("p.yaml", GOOD)])
    assert [t.name for t in loaded.tiers] == ["light", "heavy"]
    assert len(loaded.users) == 4


def test_memory_min_zero_is_a_value():
    loaded = policy.load_texts([("p.yaml", GOOD)])
    light = loaded.tier("light")
    assert light.memory_min == 0
    assert light.knobs()["memory.min"] == "0"


def test_sizes_and_cpu_max_parsed():
    heavy = policy.load_texts([("p.yaml", GOOD)]).tier("heavy")
    assert heavy.memory_min == 128 * 2**20
    assert heavy.memory_high == 2**30
    assert heavy.knobs()["cpu.max"] == "50000 100000"


def test_idle_timeout_default_and_override():
    users = policy.load_texts([("p.yaml", GOOD)]).users
    assert users[0].idle_timeout == 20.0
    assert users[1].idle_timeout == 5.0


@pytest.mark.parametrize("weight", ["0", "20000"])
def test_cpu_weight_out_of_range(weight):
    text = GOOD.replace("cpu.weight: 200", f"cpu.weight: {weight}")
    (problem,) = problems_of(text)
    assert problem.startswith("p.yaml:4: tiers.light.cpu.weight:")
    assert "1..10000" in problem


def test_cpu_weight_error_names_users_of_tier():
    text = GOOD.replace("cpu.weight: 200", "cpu.weight: 0")
    (problem,) = problems_of(text)
    assert "user alice" in problem


def test_duplicate_key_names_both_lines():
    text = GOOD.replace(
        "    memory.min: 0\n", "    memory.min: 0\n    cpu.weight: 300\n"
    )
    (problem,) = problems_of(text)
    assert problem.startswith("p.yaml:6: tiers.light.cpu.weight: duplicate key")
    assert "line 4" in problem


@pytest.mark.parametrize("name", ["no", "off", "yes", "on"])
def test_unquoted_boolean_user_name(name):
    text = GOOD.replace("name: alice", f"name: {name}")
    (problem,) = problems_of(text)
    assert problem.startswith("p.yaml:13: users[0].name:")
    assert f'quote it: "{name}"' in problem


def test_quoted_boolean_user_name_loads():
    loaded = policy.load_texts([("p.yaml", GOOD.replace("name: alice", 'name: "no"'))])
    assert loaded.users[0].match.name == "no"


def test_octal_looking_uid_rejected():
    (problem,) = problems_of(GOOD.replace("uid: 1002", "uid: 0755"))
    assert problem.startswith("p.yaml:15: users[1].uid:")
    assert "octal" in problem


def test_unknown_tier_in_pool():
    (problem,) = problems_of(
        GOOD.replace("pool: {light: 1}\n    idle", "pool: {medium: 1}\n    idle")
    )
    assert "pool.medium: unknown tier" in problem
    assert "known: heavy, light" in problem


def test_unknown_field_lists_allowed():
    (problem,) = problems_of(
        GOOD.replace("    memory.min: 0\n", "    memory.min: 0\n    memory.minn: 1\n")
    )
    assert "tiers.light.memory.minn: unknown field" in problem


def test_missing_memory_min():
    (problem,) = problems_of(GOOD.replace("    memory.min: 0\n", ""))
    assert "tiers.light.memory.min: missing" in problem


def test_user_needs_exactly_one_match():
    (problem,) = problems_of(
        GOOD.replace("  - name: alice\n", "  - name: alice\n    uid: 5\n")
    )
    assert "exactly one of name, uid, uids, group" in problem


def test_reversed_uid_range():
    (problem,) = problems_of(GOOD.replace("2000-2999", "2999-2000"))
    assert "reversed" in problem


def test_syntax_error_has_line():
    (problem,) = problems_of("tiers:\n  light: [\n")
    assert problem.startswith("p.yaml:")
    assert "(syntax)" in problem


def test_all_problems_reported_together():
    text = GOOD.replace("cpu.weight: 200", "cpu.weight: 0").replace(
        "uid: 1002", "uid: 0755"
    )
    assert len(problems_of(text)) == 2


def test_tier_defined_in_two_files():
    second = "tiers:\n  light:\n    cpu.weight: 5\n    memory.min: 0\n"
    with pytest.raises(PolicyError) as caught:
        policy.load_texts([("a.yaml", GOOD), ("b.yaml", second)])
    (problem,) = caught.value.problems
    assert str(problem).startswith(
        "b.yaml:2: tiers.light: tier defined twice (also at a.yaml:3)"
    )


def test_bundled_default_loads():
    loaded = policy.load([])
    assert loaded.sources == (str(policy.BUNDLED_DEFAULT),)
    assert loaded.users


def test_load_directory_sorted(tmp_path):
    (tmp_path / "20-users.yaml").write_text(
        "users:\n  - name: bob\n    pool: {light: 1}\n"
    )
    (tmp_path / "10-tiers.yaml").write_text(
        "tiers:\n  light:\n    cpu.weight: 100\n    memory.min: 0\n"
    )
    (tmp_path / "notes.txt").write_text("not a policy")
    loaded = policy.load([tmp_path])
    assert [p.rsplit("/", 1)[-1] for p in loaded.sources] == [
        "10-tiers.yaml",
        "20-users.yaml",
    ]


def test_specific_match_wins():
    loaded = policy.load_texts(
        [("p.yaml", GOOD.replace("uids: 2000-2999", "uids: 1000-2999"))]
    )
    assert loaded._best_entry(1002, None, frozenset()).match.uid == 1002
    assert loaded._best_entry(1500, None, frozenset()).match.uid_range == (1000, 2999)
    assert loaded._best_entry(5000, None, frozenset({"devs"})).match.group == "devs"


FORECAST = "forecast:\n  enabled: true\n"


@pytest.mark.parametrize(
    "key", ["interval", "plan_interval", "horizon_min", "service_time"]
)
def test_forecast_zero_duration_rejected(key):
    (problem,) = problems_of(GOOD + FORECAST + f"  {key}: 0s\n")
    assert f"forecast.{key}: 0s is too short" in problem


def test_forecast_plan_faster_than_sampling():
    (problem,) = problems_of(GOOD + FORECAST + "  interval: 10s\n  plan_interval: 5s\n")
    assert "forecast.plan_interval: 5s is shorter than interval 10s" in problem


def test_zero_idle_timeout_is_kept():
    loaded = policy.load_texts(
        [("p.yaml", GOOD.replace("idle_timeout: 20s", "idle_timeout: 0s"))]
    )
    assert loaded.users[0].idle_timeout == 0.0


def test_idle_timeout_applies_across_files():
    users = "users:\n  - name: bob\n    pool: {light: 1}\n"
    tiers = (
        "idle_timeout: 20s\ntiers:\n  light:\n    cpu.weight: 100\n    memory.min: 0\n"
    )
    loaded = policy.load_texts([("00-global.yaml", tiers), ("10-users.yaml", users)])
    assert loaded.users[0].idle_timeout == 20.0


def test_idle_timeout_set_twice():
    with pytest.raises(PolicyError) as caught:
        policy.load_texts([("a.yaml", GOOD), ("b.yaml", "idle_timeout: 5s\n")])
    (problem,) = caught.value.problems
    assert str(problem).startswith(
        "b.yaml:1: idle_timeout: default set twice (also at a.yaml:1)"
    )


def test_root_uid_rejected():
    (problem,) = problems_of(GOOD.replace("uid: 1002", "uid: 0"))
    assert "users[1].uid" in problem
    assert "1..4294967294" in problem


def test_uid_range_with_root_rejected():
    (problem,) = problems_of(GOOD.replace("2000-2999", "0-2999"))
    assert "includes root" in problem


def test_non_octal_leading_zero_hint():
    (problem,) = problems_of(GOOD.replace("uid: 1002", "uid: 08"))
    assert "write 8 without the leading zero" in problem
    assert "0o8" not in problem


def test_null_user_name_rejected():
    (problem,) = problems_of(GOOD.replace("name: alice", "name: ~"))
    assert problem.startswith("p.yaml:13: users[0].name: is empty")


def test_top_level_scalar_names_field():
    (problem,) = problems_of("just text\n")
    assert problem.startswith("p.yaml:1: (top level): expected a mapping")


def test_explicit_empty_directory_is_an_error(tmp_path):
    with pytest.raises(PolicyError) as caught:
        policy.load([tmp_path])
    assert "contains no *.yaml or *.yml policy file" in str(caught.value)


def test_advice_names_unknown_account():
    loaded = policy.load_texts(
        [("p.yaml", GOOD.replace("name: alice", "name: no-such-user-x"))]
    )
    (line,) = [a for a in policy.advice(loaded) if "name:" in a]
    assert line.startswith("p.yaml:13: name: no account named 'no-such-user-x'")


def test_managed_users_never_include_root():
    text = GOOD.replace("group: devs", "group: root")
    assert 0 not in policy.load_texts([("p.yaml", text)]).managed_users()


def test_invalid_utf8_names_line(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_bytes(GOOD.encode().replace(b"alice", b"al\xffce"))
    with pytest.raises(PolicyError) as caught:
        policy.load([path])
    problems = [str(p) for p in caught.value.problems]
    # alice is on line 13 of GOOD.
    assert problems == [
        f"{path}:13: (file): invalid UTF-8 byte 0xff; save the file as UTF-8"
    ]


def test_size_above_64_bits():
    text = GOOD.replace("memory.min: 128M", "memory.min: 18446744073709551616")
    problems = problems_of(text)
    assert len(problems) == 1
    assert problems[0].startswith("p.yaml:8: tiers.heavy.memory.min: size ")
    assert "above 2**64 - 1 bytes" in problems[0]


def test_unknown_field_near_miss():
    problems = problems_of(GOOD.replace("cpu.weight: 800", "cpu.wieght: 800"))
    assert any(
        p.startswith("p.yaml:7: tiers.heavy.cpu.wieght: unknown field")
        and "did you mean cpu.weight?" in p
        for p in problems
    )


def test_dangling_symlink_in_directory(tmp_path):
    (tmp_path / "a.yaml").write_text(GOOD)
    (tmp_path / "b.yaml").symlink_to(tmp_path / "absent.yaml")
    with pytest.raises(PolicyError) as caught:
        policy.load([tmp_path])
    problems = [str(p) for p in caught.value.problems]
    assert problems == [
        f"{tmp_path / 'b.yaml'}:1: (file): cannot be read: No such file or "
        "directory; check the path and its permissions"
    ]


def test_memory_low_above_high_rejected():
    text = GOOD.replace("memory.low: 256M", "memory.low: 2G")
    (problem,) = problems_of(text)
    assert problem.startswith("p.yaml:9: tiers.heavy.memory.low: is above memory.high")


def test_second_document_names_fix():
    (problem,) = problems_of(GOOD + "---\nusers: []\n")
    assert "remove the '---' line" in problem


def test_advice_warns_without_users():
    loaded = policy.load_texts([("p.yaml", "tiers: {}\n")])
    (line,) = policy.advice(loaded)
    assert line.startswith("p.yaml: users: none listed")


def test_path_given_twice_loaded_once(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text(GOOD)
    paths = policy.resolve_policy_paths([str(path), str(tmp_path / "." / "a.yaml")])
    assert paths == [path]


MERGED = """\
tiers:
  light: &base
    cpu.weight: 200
    memory.min: 32M
  heavy:
    <<: *base
    cpu.weight: 800
users:
  - uid: 5000
    pool: {light: 1, heavy: 1}
"""


def test_merge_key_fills_missing_fields():
    heavy = policy.load_texts([("p.yaml", MERGED)]).tier("heavy")
    assert heavy.memory_min == 32 * 2**20


def test_merge_key_explicit_field_wins():
    heavy = policy.load_texts([("p.yaml", MERGED)]).tier("heavy")
    assert heavy.cpu_weight == 800


def test_merge_key_scalar_rejected():
    text = MERGED.replace("<<: *base", "<<: 3")
    problems = problems_of(text)
    assert any(
        p.startswith("p.yaml:6: tiers.heavy.<<: a merge key takes") for p in problems
    )
