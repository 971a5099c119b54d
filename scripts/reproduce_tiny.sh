#!/usr/bin/env bash
# The paper's tables and figures at the tiny scale (model=tiny task=arith), as docs/results.md reports them: each
# sweep file through submitit_local (two jobs at a time), then `reasoning_rl.report` on that sweep.
#   bash scripts/reproduce_tiny.sh                                   # all four sweeps, seeds 0,1,2
#   SEEDS=0 bash scripts/reproduce_tiny.sh sft_table ei_rounds      # some of them, one seed
# Runs land in $MLFLOW_TRACKING_URI (default: results/mlflow.db, apart from ./mlflow.db), each sweep in
# results/multirun/<sweep>, its report in results/<sweep>/, and each sweep's wall time in results/wall_times.txt.
# A sweep already run is not recomputed (resume=true: its jobs say "Already done"), so an interrupted script can be
# typed again.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
out=${OUT:-results}
seeds=${SEEDS:-0,1,2}
export REASONING_RL_THREADS=${REASONING_RL_THREADS:-1}  # 2 jobs x 1 thread on a 2-core machine
mkdir -p "$out"
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$(cd "$out" && pwd)/mlflow.db}

sweeps=("$@")
[ ${#sweeps[@]} -gt 0 ] || sweeps=(sft_table sample_complexity ei_rounds pretrained_table)
for sweep in "${sweeps[@]}"; do
    start=$(date +%s)
    "$python" main.py -m --config-dir sweeps --config-name "$sweep" model=tiny task=arith "seed=$seeds" \
        hydra/launcher=submitit_local hydra.sweeper.max_batch_size=2 "hydra.sweep.dir=$out/multirun/$sweep"
    echo "$sweep seeds=$seeds $(( $(date +%s) - start )) s $(date -u +%FT%TZ)" >> "$out/wall_times.txt"
    "$python" -m reasoning_rl.report --sweep-dir "$out/multirun/$sweep" --paper --out "$out/$sweep"
done
