#!/bin/sh
# Run the replay benchmarks whose results docs/benchmarks.md records.
# Usage: sh bench/replay.sh [OUTDIR]   (default bench/results; about 35 min on 2 cores)
set -eu
out=${1:-bench/results}
mkdir -p "$out"
py=${PYTHON:-python}
export PYTHONPATH=.

# Azure Functions 2019 sample: 428 owners, 8 h, planning every minute.
nice -n 10 "$py" -m broker.replay bench/data/azure-functions-2019-sample \
    --methods gp,gp-peak,static,reactive,window-percentile,decaying-histogram,oracle-static \
    --json --plot "$out/azure-functions.png" > "$out/azure-functions.json"

# Value sizing (one price per idle slot-second) on the same trace.
nice -n 10 "$py" -m broker.replay bench/data/azure-functions-2019-sample \
    --methods gp-value --json > "$out/azure-functions-gp-value.json"

# The bound with hindsight per interval, on the same trace.
nice -n 10 "$py" -m broker.replay bench/data/azure-functions-2019-sample \
    --methods oracle-dynamic --json > "$out/azure-functions-oracle-dynamic.json"

# Azure LLM inference 2023: two services, 1 h, planning every 5 s.
"$py" bench/llm_to_csv.py > "$out/llm.csv"
nice -n 10 "$py" -m broker.replay "$out/llm.csv" --interval 5 --warmup 120 \
    --methods gp,gp-peak,static,reactive,window-percentile,decaying-histogram,oracle-static \
    --json --plot "$out/llm.png" > "$out/llm.json"
rm -f "$out/llm.csv"

# Planner tick cost.
nice -n 10 "$py" bench/tick.py --json > "$out/tick.json"
