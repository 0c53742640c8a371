"""broker: warm cgroup v2 slices per user, activated by eBPF accept probes."""

__version__ = "0.1.0"
