"""Host tests need root and a real kernel; they touch only what they create.

Outside CI they skip when not root; in CI (CI=true) a missing requirement
is a failure, so a misconfigured runner cannot pass by skipping.
"""

import os

import pytest


def require(condition: bool, reason: str) -> None:
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture
def root_only():
    require(os.geteuid() == 0, "needs root")
