"""The broker's error family.

Every error the broker raises on purpose derives from BrokerError. OSError is
translated once, at the kernel boundary (cgroups, bpf, netshape), with the
cause chained, so a message names the operation, the object and the fix.
"""

from __future__ import annotations

import errno as errno_mod
import os


class BrokerError(Exception):
    """Base of all errors the broker raises on purpose."""


class PolicyError(BrokerError):
    """One or more problems in policy files, listed in `problems`."""

    def __init__(self, problems: list["PolicyProblem"]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class PolicyProblem:
    """One policy problem at FILE:LINE, in the form `broker check` prints."""

    def __init__(self, path: str, line: int, field: str, problem: str, fix: str):
        self.path = path
        self.line = line
        self.field = field
        self.problem = problem
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.field}: {self.problem}; {self.fix}"

    def __repr__(self) -> str:
        return f"PolicyProblem({str(self)!r})"


class KernelError(BrokerError):
    """A kernel interface call failed; carries errno and the path or object."""

    def __init__(self, operation: str, target: str, err: int, hint: str = ""):
        self.operation = operation
        self.target = target
        self.errno = err
        self.hint = hint
        text = f"failed to {operation} {target}: {os.strerror(err)}"
        if hint:
            text += f" ({hint})"
        super().__init__(text)


class CgroupError(KernelError):
    """A cgroupfs operation failed."""


class ControllerMissingError(CgroupError):
    """A controller is not available at some level of a cgroup path."""

    def __init__(self, controller: str, level: str):
        self.controller = controller
        self.level = level
        BrokerError.__init__(
            self,
            f"controller {controller!r} is not available at {level}: enable it in "
            f"the parent's cgroup.subtree_control, or set Delegate=yes on the unit",
        )
        self.operation = "enable controller"
        self.target = level
        self.errno = errno_mod.ENOENT
        self.hint = ""


class BpfError(KernelError):
    """Loading, attaching or using a BPF object failed."""


class NetshapeError(KernelError):
    """A tc/netlink operation failed."""


def hint_for(err: int) -> str:
    """Return the usual fix for an errno seen at a kernel boundary."""
    if err in (errno_mod.EPERM, errno_mod.EACCES):
        return "run as root with CAP_SYS_ADMIN, or check the unit's hardening"
    if err == errno_mod.EBUSY:
        return "the cgroup is in use; see the log for the blocking pids"
    if err == errno_mod.ENOENT:
        return "the path does not exist; is cgroup v2 mounted at /sys/fs/cgroup?"
    return ""
