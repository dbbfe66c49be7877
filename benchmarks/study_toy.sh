#!/usr/bin/env bash
# The toy-source study of benchmarks/RESULTS.md ("The whole preset re-run with its records"): the preset study
# (dtnh_jax.train.presets.GRIDS["study"], 415 runs) from the two toy sources as pre-trained with seed 0, two
# processes side by side (one per source; from scratch under the first only). With --pretrain, the L2-SP and
# KnowDist families from two more pre-trainings of each source (--pretrain-seed 1, 2): the source's pre-training
# as a factor of the design. With --learning-rates, the same families from `unrelated` at learning rates 0.005
# and 0.02 (the preset's: 0.01): the learning-rate control. A diverged run is recorded at chance and its grid
# goes on. With --official, KnowDist and DELTA ± DTNH as their official code runs them (KnowDist summed over
# positions, DELTA averaged, the head term β 0.01, both weights the official 0.24 per example at batch 48, fixed
# before any run) on the preset's λ grid (0.001-10 times those weights), fine-tuning beside; the preset's own
# KnowDist and DELTA use spatial_mean for both, which makes DELTA KnowDist with a nearly flat attention. With
# --l2-controls, the controls of L2's gain: L2 ± DTNH trained from scratch (--source scratch, fine-tuning from
# scratch beside as its λ 0, in the preset's grid folder) and from `unrelated` at the learning-rate control's two
# rates (added to those grids, whose fine-tuning runs are already there). With --candidates, the never-hurt
# candidates on L2-SP and KnowDist from both sources (pre-training 0), one grid each: the share bound on the moving
# average of g at κ 0.1, 0.25 (the real source's best) and 0.5, and on the current |g| at κ 1. Interrupted, it
# resumes where it stopped.
#
#   bash benchmarks/study_toy.sh [WORKDIR] [--pretrain | --learning-rates | --official | --l2-controls | --candidates]
#   (default WORKDIR runs/study-toy; logs: WORKDIR/*.log)
#   python benchmarks/study_records.py collect WORKDIR --out benchmarks/records/study_toy.jsonl
#   python benchmarks/study_records.py tables benchmarks/records/study_toy.jsonl --out benchmarks/records/study_toy.md
set -euo pipefail
workdir="${1:-runs/study-toy}"
mkdir -p "$workdir"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$workdir/jax-cache}"
others="fine-tune,l2,dtnh-l2,l2-sp,dtnh-l2-sp,knowdist,dtnh-knowdist,delta,dtnh-delta"

# study LOG GRID FLAGS...: one dtnh-train grid of the preset, diverged runs recorded, into WORKDIR/GRID, logged to
# WORKDIR/LOG
study() {
  local log=$1 grid=$2
  shift 2
  dtnh-train --preset study --on-nonfinite record --no-progress --workdir "$workdir/$grid" "$@" \
    > "$workdir/$log" 2>&1
}

if [[ "${2:-}" == "--official" ]]; then
  for source in related unrelated; do
    study "$source-official.log" official --source "$source" \
      --method fine-tune,knowdist,dtnh-knowdist,delta,dtnh-delta \
      --feature-normalize official --head-beta 0.01 --knowdist-weight 0.24 --delta-weight 0.24 &
  done
  wait
elif [[ "${2:-}" == "--candidates" ]]; then
  # two processes, each a list of candidates (reference κ) run one after the other
  for candidates in "average 0.25,average 0.1" "current 1,average 0.5"; do
    IFS=, read -r -a list <<< "$candidates"
    for candidate in "${list[@]}"; do
      read -r reference kappa <<< "$candidate"
      for source in related unrelated; do
        study "$source-share-bound-$reference-$kappa.log" "share-bound-$reference-$kappa" --source "$source" \
          --method dtnh-l2-sp,dtnh-knowdist --projection share-bound \
          --share-bound-reference "$reference" --share-bound-kappa "$kappa"
      done
    done &
  done
  wait
elif [[ "${2:-}" == "--l2-controls" ]]; then
  study scratch-l2.log study --source scratch --method fine-tune,l2,dtnh-l2 &
  for rate in 0.005 0.02; do
    study "unrelated-lr$rate-l2.log" "lr$rate" --source unrelated --learning-rate "$rate" \
      --method fine-tune,l2,dtnh-l2
  done &
  wait
elif [[ "${2:-}" == "--learning-rates" ]]; then
  # the learning-rate control: fine-tuning, L2-SP and KnowDist ± DTNH from `unrelated` (pre-training 0) at half
  # and twice the preset's 0.01, so that a DTNH(X) − X can be read beside what a larger step gives X alone
  for rate in 0.005 0.02; do
    study "unrelated-lr$rate.log" "lr$rate" --source unrelated --learning-rate "$rate" \
      --method fine-tune,l2-sp,dtnh-l2-sp,knowdist,dtnh-knowdist &
  done
  wait
elif [[ -z "${2:-}" ]]; then
  study related.log study --source related &
  study unrelated.log study --source unrelated --method "$others" &
  wait
elif [[ "${2:-}" == "--pretrain" ]]; then
  for seed in 1 2; do  # one grid per pre-training (a grid's runs are keyed by method, λ and seed, not the source's seed)
    for source in related unrelated; do
      study "$source-pretrain$seed.log" "pretrain$seed" --source "$source" --pretrain-seed "$seed" \
        --method fine-tune,l2-sp,dtnh-l2-sp,knowdist,dtnh-knowdist &
    done
    wait
  done
else
  echo "study_toy.sh: unknown option ${2}; choose --pretrain, --learning-rates, --official, --l2-controls or --candidates" >&2
  exit 2
fi
