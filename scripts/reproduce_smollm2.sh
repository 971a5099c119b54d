#!/usr/bin/env bash
# The paper's tables on SmolLM2-135M (model=smollm2_135m, rollout=vllm), as docs/results.md reports them: each part
# a sweep file through submitit_local, one job at a time (each job uses both cores), then `reasoning_rl.report`.
# The whole set is ~25 h on a 2-core Intel Xeon with AMX, so it is meant to be typed again, session after session:
# finished jobs say "Already done", a killed job resumes from its last checkpoint, and the parts run in this order.
#   bash scripts/reproduce_smollm2.sh                     # every part, in order
#   bash scripts/reproduce_smollm2.sh sft_seeds sft_table # some of them
# Parts:
#   sft_seeds         the SFT-init rows SFT, EI, Sparse PPO with seeds 0 and 1 (arith)
#   sft_table         the whole SFT-init table, seed 0 (arith)
#   pretrained_table  the whole pretrained-init table, seed 0 (arith)
#   gsm8k             Prompted, SFT, EI, Sparse PPO from the SFT init on GSM8K, seed 0
#   sample_complexity, ei_rounds   the two figures (arith, seed 0)
# Runs land in $MLFLOW_TRACKING_URI (default: results/mlflow.db), each part in results/multirun/smollm2_<part>, its
# report in results/smollm2_<part>/, and each part's wall time in results/wall_times.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
out=${OUT:-results}
mkdir -p "$out"
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$(cd "$out" && pwd)/mlflow.db}
common=(model=smollm2_135m rollout=vllm hydra/launcher=submitit_local hydra.sweeper.max_batch_size=1)

run_part() {  # run_part <part> <sweep file> <overrides...>
    local part=$1 sweep=$2 start
    shift 2
    start=$(date +%s)
    "$python" main.py -m --config-dir sweeps --config-name "$sweep" "${common[@]}" "$@" \
        "hydra.sweep.dir=$out/multirun/smollm2_$part"
    echo "smollm2_$part $* $(( $(date +%s) - start )) s $(date -u +%FT%TZ)" >> "$out/wall_times.txt"
    "$python" -m reasoning_rl.report --sweep-dir "$out/multirun/smollm2_$part" --paper --out "$out/smollm2_$part"
}

parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(sft_seeds sft_table pretrained_table gsm8k sample_complexity ei_rounds)
for part in "${parts[@]}"; do
    case $part in
        sft_seeds) run_part "$part" sft_table task=arith row=sft,ei,sparse_ppo seed=0,1 ;;
        sft_table) run_part "$part" sft_table task=arith seed=0 ;;
        pretrained_table) run_part "$part" pretrained_table task=arith seed=0 ;;
        gsm8k) run_part "$part" sft_table task=gsm8k row=sft,ei,sparse_ppo seed=0 &&
               run_part "${part}_prompted" pretrained_table task=gsm8k row=prompted seed=0 ;;
        sample_complexity | ei_rounds) run_part "$part" "$part" task=arith seed=0 algo.eval_init=true ;;
        *) echo "unknown part '$part': one of sft_seeds sft_table pretrained_table gsm8k sample_complexity ei_rounds" >&2
           exit 2 ;;
    esac
done
