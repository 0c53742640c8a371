"""Guest tests run only inside the test VM, where the rig sets BROKER_VM_GUEST=1.

They create cgroups, users and services, so on the host every one of them is
skipped: run tests/vm/test_vm.py there, which boots the VM and runs them in it.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _only_in_guest() -> None:
    if os.environ.get("BROKER_VM_GUEST") != "1":
        pytest.skip("guest test: runs only inside the test VM (see tests/vm/rig.py)")
