#!/bin/bash
# Measure accept-to-move latency over 1000 activations of real processes in
# the test VM, once with cgroup2 as Debian mounts it and once remounted with
# favordynmods, and print the two result records (JSON).
#
#   sudo bench/vm_latency.sh
#
# Needs what scripts/test installs (qemu, mmdebstrap, the .venv). Under TCG
# every number is many times what the same kernel shows on hardware: compare
# the two records with each other, not with host numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
make bpf >/dev/null
script=$(mktemp)
trap 'rm -f "$script"' EXIT
cat >"$script" <<'GUEST'
#!/bin/bash
cd "$BROKER_VM_PROJECT"
/opt/broker/bin/python -P -m pytest -q -p no:cacheprovider tests/vm/guest/test_latency.py
status=$?
cat "$BROKER_VM_SHARE"/results/latency-*.json
exit $status
GUEST
exec python3 tests/vm/rig.py run "$script"
