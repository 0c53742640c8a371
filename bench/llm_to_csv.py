"""Convert the Azure LLM inference 2023 traces to the replay's generic CSV.

Usage: python bench/llm_to_csv.py > /tmp/llm.csv

Each service (code, conv) is one user; each request is one arrival. The
trace records tokens, not durations, so a request's service time is an
estimate: PREFILL_SECONDS_PER_TOKEN per context token plus
DECODE_SECONDS_PER_TOKEN per generated token. The constants are assumptions
of the order of what Splitwise (Patel et al., ISCA 2024) reports for a large
model on one node, not measurements.
"""

from __future__ import annotations

import csv
import sys
from datetime import datetime
from pathlib import Path

DATA = Path(__file__).parent / "data" / "azure-llm-inference-2023"
PREFILL_SECONDS_PER_TOKEN = 0.0002
DECODE_SECONDS_PER_TOKEN = 0.03


def main() -> int:
    writer = csv.writer(sys.stdout)
    writer.writerow(["timestamp", "user", "duration_s"])
    for service in ("code", "conv"):
        with open(DATA / f"AzureLLMInferenceTrace_{service}.csv", newline="") as handle:
            for row in csv.DictReader(handle):
                # Seven fractional digits: cut to the six that datetime reads.
                stamp = datetime.strptime(row["TIMESTAMP"][:26], "%Y-%m-%d %H:%M:%S.%f")
                duration = (
                    int(row["ContextTokens"]) * PREFILL_SECONDS_PER_TOKEN
                    + int(row["GeneratedTokens"]) * DECODE_SECONDS_PER_TOKEN
                )
                writer.writerow(
                    [f"{stamp.timestamp():.6f}", service, f"{duration:.4f}"]
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
