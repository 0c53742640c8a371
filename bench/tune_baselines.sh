#!/bin/sh
# Tune the window of window-percentile and the half-life of decaying-histogram
# on the Azure Functions sample, so the comparison uses each baseline at its best.
# Usage: sh bench/tune_baselines.sh [OUTDIR]   (about 10 min on 2 cores)
set -eu
out=${1:-bench/results}
mkdir -p "$out"
py=${PYTHON:-python}
export PYTHONPATH=.
for w in 15 60 240; do
    nice -n 10 "$py" -m broker.replay bench/data/azure-functions-2019-sample \
        --methods window-percentile --percentile-window "$w" --json \
        > "$out/tune-window-percentile-$w.json"
done
for h in 15 60 240; do
    nice -n 10 "$py" -m broker.replay bench/data/azure-functions-2019-sample \
        --methods decaying-histogram --half-life "$h" --json \
        > "$out/tune-decaying-histogram-$h.json"
done
