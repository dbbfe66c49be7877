#!/usr/bin/env bash
# The mechanism test of benchmarks/RESULTS.md ("Does full-batch DTNH close the gap?"): fine-tuning, L2-SP and
# DTNH(L2-SP) at a constant λ 1 (--reg-decay 1, so that a full-batch run, one step per epoch, keeps the same λ as a
# minibatch one), minibatch (48) vs full batch (the 300 training images), momentum 0.9 vs 0, 5 seeds, from the toy
# source `unrelated` (preset study) and from EfficientNet-Lite0's ImageNet weights (preset study-imagenet, the
# imagenet-lite extra), on digits. One grid per (source, batch, momentum), the cheap ones first; interrupted, it
# resumes where it stopped. The prediction (#24): averaged over minibatches DTNH's step is ḡ + λ(I − P)r with
# trace P ≤ 1, so minibatch DTNH keeps most of L2-SP's pull, while a full-batch DTNH, whose g is ḡ, removes it
# where it conflicts and closes most of L2-SP's gap to fine-tuning.
#
#   bash benchmarks/mechanism.sh [WORKDIR]                # default runs/mechanism; logs in WORKDIR/*.log
#   python benchmarks/study_records.py collect WORKDIR    # then: the records and the table
set -euo pipefail
workdir="${1:-runs/mechanism}"
mkdir -p "$workdir"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$workdir/jax-cache}"
start=$(date +%s)
status=0
for setting in "study unrelated 48 0.9" "study unrelated 300 0.9" "study unrelated 48 0" "study unrelated 300 0" \
               "study-imagenet imagenet 48 0.9" "study-imagenet imagenet 300 0.9" \
               "study-imagenet imagenet 48 0" "study-imagenet imagenet 300 0"; do
  read -r preset source batch momentum <<< "$setting"
  name="$source-batch$batch-momentum$momentum"
  echo "$(date -u +%H:%M:%S) $name" >> "$workdir/mechanism.log"
  dtnh-train --preset "$preset" --source "$source" --method fine-tune,l2-sp,dtnh-l2-sp --seeds 0,1,2,3,4 \
    --reg-weight 1 --reg-decay 1 --batch-size "$batch" --momentum "$momentum" --on-nonfinite record \
    --workdir "$workdir/$name" --no-progress >> "$workdir/$name.log" 2>&1 || status=1
done
echo "mechanism: $(( ($(date +%s) - start) / 60 )) min wall, exit $status" | tee -a "$workdir/wall.txt"
exit "$status"
