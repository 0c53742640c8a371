"""Print the markdown tables of docs/benchmarks.md from `broker replay --json` outputs.

Usage: python bench/summarize.py bench/results/azure-functions.json [more.json ...]

Methods of all files are merged into one table per setting, in file order.
"""

from __future__ import annotations

import json
import sys

COLUMNS = (
    ("knob", "knob", "{:.4g}"),
    ("pooled hit", "warm_hit_rate", "{:.4f}"),
    ("user median", "user_hit_rate_median", "{:.3f}"),
    ("users < 50%", "users_below_half", "{}"),
    ("idle slot-s", "idle_slot_seconds", "{:,.0f}"),
    ("idle GB-s", "idle_memory_gb_seconds", "{:,.0f}"),
    ("coverage", "coverage", "{:.3f}"),
    ("pinball", "pinball_loss", "{:.4f}"),
)


def cell(values: dict | None, key: str, fmt: str) -> str:
    if values is None:
        return "not reached"
    value = values.get(key)
    return "-" if value is None else fmt.format(value)


def table(methods: dict, pick) -> list[str]:
    lines = ["| method | " + " | ".join(c[0] for c in COLUMNS) + " |"]
    lines.append("|---" * (len(COLUMNS) + 1) + "|")
    for name, result in methods.items():
        values = pick(result)
        cells = [cell(values, key, fmt) for _, key, fmt in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    methods: dict = {}
    reports = []
    for path in sys.argv[1:]:
        with open(path) as handle:
            report = json.load(handle)
        reports.append(report)
        methods.update(report["methods"])
    first = reports[0]
    print(
        f"{first['trace']}: {first['users']} users, {first['arrivals']} arrivals, "
        f"interval {first['interval_seconds']:g} s, warm-up {first['warmup_intervals']}\n"
    )
    sections = (
        ("At each method's default knob", lambda r: r),
        (
            f"Smallest knob with pooled hit rate >= {first['target_hit_rate']:g}",
            lambda r: r.get("at_target"),
        ),
        (
            "Smallest knob that also gives a per-user median hit rate >= 0.9",
            lambda r: r.get("at_target_with_median"),
        ),
    )
    for title, pick in sections:
        print(f"{title}:\n")
        print("\n".join(table(methods, pick)))
        print()
    fit = ", ".join(f"{n} {r['fit_cpu_seconds']:.1f}" for n, r in methods.items())
    print(f"Fit CPU seconds: {fit}\n")
    for report in reports:
        if "gp_calibration" in report:
            calibration = report["gp_calibration"]
            pairs = ", ".join(
                f"{q}: {v:.3f}" for q, v in calibration["coverage"].items()
            )
            print(f"gp calibration (mean PIT coverage at the nominal level): {pairs}")
            print(
                f"gp forecasts per model: {calibration['models']}; anomalies "
                f"{calibration['anomalies']}, refits {calibration['refits']}, "
                f"kernel fits {calibration['kernel_fits']}\n"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
