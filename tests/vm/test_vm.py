"""One host test per guest test in tests/vm/guest, judged by the guest's JUnit XML.

The VM boots once per session, in the `guest_run` fixture of conftest.py, which
also parametrizes `guest_test` with the guest test ids.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.vm

# pytest exit codes that mean the guest session ran to its end: all tests
# passed, or some failed.
GUEST_PYTEST_COMPLETED = (0, 1)


def test_guest_session(guest_run) -> None:
    assert guest_run.exit_code in GUEST_PYTEST_COMPLETED, (
        f"guest pytest exited with {guest_run.exit_code}; see {guest_run.output_log}"
    )


def test_guest(guest_test, guest_run) -> None:
    if isinstance(guest_test, Exception):
        pytest.fail(str(guest_test), pytrace=False)
    outcome = guest_run.outcome(guest_test)
    if outcome is None:
        pytest.fail(
            f"no result for {guest_test} in the guest's JUnit XML; "
            f"see {guest_run.output_log}",
            pytrace=False,
        )
    if outcome.status == "skipped":
        pytest.skip(outcome.text)
    if outcome.status == "failed":
        pytest.fail(f"{outcome.text}\n(guest output: {guest_run.output_log})", False)
    assert outcome.status == "passed"
