"""Host side of the VM tests.

The session fixture `guest_run` boots the test VM once (tests/vm/rig.py) and
runs pytest on tests/vm/guest inside it, from the venv that scripts/install
made. test_vm.py turns each guest test into one host test whose outcome comes
from the guest's JUnit XML. The host learns the guest test ids by running
`pytest --collect-only` on tests/vm/guest, so guest modules must import on the
host without side effects.

Without root, qemu or mmdebstrap the VM tests are skipped, except under CI=true,
where they fail instead. BROKER_VM_TIMEOUT sets the seconds the whole guest
session may take (default 3600); tests/vm/rig.py lists its own variables.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from xml.etree import ElementTree

import pytest

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parents[1]
GUEST_TESTS = "tests/vm/guest"
REQUIRED_TOOLS = ("qemu-system-x86_64", "qemu-img", "mmdebstrap", "mkfs.ext4", "make")
GUEST_TIMEOUT = float(os.environ.get("BROKER_VM_TIMEOUT", "3600"))
COLLECT_TIMEOUT = 300

# The guest tests change cgroups, users and services. Never collect them on the
# host, except for listing their ids (BROKER_VM_COLLECT) and inside the VM.
if not (os.environ.get("BROKER_VM_GUEST") or os.environ.get("BROKER_VM_COLLECT")):
    collect_ignore = ["guest"]

GUEST_SCRIPT = f"""#!/bin/bash
# Runs the guest tests inside the VM from the venv that scripts/install made.
# -P keeps the project copy out of sys.path, so the installed broker is tested.
cd "$BROKER_VM_PROJECT"
exec /opt/broker/bin/python -P -m pytest -p no:cacheprovider -v -rA \\
    --junitxml="$BROKER_VM_SHARE/junit.xml" {GUEST_TESTS} "$@"
"""  # "$@" is replaced by the host's -k selection, if any

_guest_log: Path | None = None
_guest_timings: dict[str, float] = {}


@dataclass(frozen=True)
class GuestOutcome:
    """One guest test's result: "passed", "failed" or "skipped", with its text."""

    status: str
    text: str = ""


@dataclass(frozen=True)
class GuestRun:
    """The guest pytest session: its exit code, results by node id and log."""

    exit_code: int
    outcomes: dict[str, GuestOutcome]
    output_log: Path

    def outcome(self, node_id: str) -> GuestOutcome | None:
        return self.outcomes.get(junit_key(node_id))


def load_rig() -> ModuleType:
    spec = importlib.util.spec_from_file_location("broker_vm_rig", HERE / "rig.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def missing_requirements() -> list[str]:
    problems = [] if os.geteuid() == 0 else ["not running as root"]
    for tool in REQUIRED_TOOLS:
        if shutil.which(tool) is None:
            problems.append(f"{tool} not found")
    return problems


def collect_guest_ids() -> list[str]:
    """Return the node ids of the guest tests; raise RuntimeError on failure."""
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q"]
    command += ["-p", "no:cacheprovider", GUEST_TESTS]
    env = dict(os.environ, BROKER_VM_COLLECT="1")
    listing = subprocess.run(
        command,
        check=False,
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=COLLECT_TIMEOUT,
    )
    if listing.returncode not in (0, 5):  # 5: no tests collected
        raise RuntimeError(
            f"collecting {GUEST_TESTS} on the host failed "
            f"(exit code {listing.returncode}):\n{listing.stdout}{listing.stderr}"
        )
    return [line for line in listing.stdout.splitlines() if "::" in line]


def junit_key(node_id: str) -> str:
    """Return "classname::name" as pytest's JUnit XML writes it for NODE_ID."""
    path, bracket, params = node_id.partition("[")
    names = path.split("::")
    names[0] = re.sub(r"\.py$", "", names[0].replace("/", "."))
    names[-1] += bracket + params
    return ".".join(names[:-1]) + "::" + names[-1]


def parse_junit(path: Path) -> dict[str, GuestOutcome]:
    """Return outcomes keyed like junit_key(); a failure outranks a pass."""
    outcomes: dict[str, GuestOutcome] = {}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        key = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = case_outcome(case)
        if key not in outcomes or outcome.status == "failed":
            outcomes[key] = outcome
    return outcomes


def case_outcome(case: ElementTree.Element) -> GuestOutcome:
    for tag in ("failure", "error"):
        problem = case.find(tag)
        if problem is not None:
            text = f"{problem.get('message', '')}\n{problem.text or ''}".strip()
            return GuestOutcome("failed", f"guest {tag}: {text}")
    skipped = case.find("skipped")
    if skipped is not None:
        return GuestOutcome("skipped", skipped.get("message", "skipped in the guest"))
    return GuestOutcome("passed")


def announce(config: pytest.Config, line: str) -> None:
    """Write LINE to the terminal now, past pytest's output capture."""
    capture = config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\n{line}", flush=True)


@pytest.fixture(scope="session")
def guest_run(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> GuestRun:
    """Boot the test VM once and run the guest tests in it."""
    problems = missing_requirements()
    if problems:
        reason = "test VM unavailable: " + "; ".join(problems)
        if os.environ.get("CI") == "true":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)

    global _guest_log
    base = tmp_path_factory.mktemp("vm")
    _guest_log = base / "guest-output.log"
    script = base / "run-guest-tests.sh"
    # The host's -k selects guest tests too, so one module does not boot all.
    keyword = request.config.option.keyword
    selection = f" -k {shlex.quote(keyword)}" if keyword else ""
    script.write_text(GUEST_SCRIPT.replace(' "$@"', selection))
    announce(request.config, f"booting the test VM; guest output: {_guest_log}")

    rig = load_rig()
    with open(_guest_log, "w") as out:
        result = rig.run_script(script, base / "share", GUEST_TIMEOUT, out=out)
    _guest_timings.update(result.timings)
    junit = base / "share" / "junit.xml"
    outcomes = parse_junit(junit) if junit.is_file() else {}
    return GuestRun(result.exit_code, outcomes, _guest_log)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize `guest_test` with the guest test ids collected on the host.

    If collection fails, the one parameter is the error, so a test reports it.
    """
    if "guest_test" not in metafunc.fixturenames:
        return
    try:
        node_ids = collect_guest_ids()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        metafunc.parametrize("guest_test", [exc], ids=["collect-error"])
        return
    short_ids = [node_id.removeprefix(GUEST_TESTS + "/") for node_id in node_ids]
    metafunc.parametrize("guest_test", node_ids, ids=short_ids)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _guest_log is not None:
        terminalreporter.write_line(f"test VM guest output: {_guest_log}")
    if _guest_timings:
        parts = [f"{name} {seconds:.1f} s" for name, seconds in _guest_timings.items()]
        terminalreporter.write_line("test VM timings: " + ", ".join(parts))
