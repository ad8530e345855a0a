#!/usr/bin/env bash
# Regenerates the runs behind "Two families in one federation" in docs/results-text.md: clients of MiniLM
# (2/4/6 layers) and SmolLM2 (8/16 layers) on the KJV by source (examples/kjv-mixed.toml), pFedLoRA's
# branch and head placements against the baselines, the validation-split choice of SmolLM2's pooling, and
# federations of each family alone; copies the tables and figures into docs/.
#
#   bash docs/regenerate-mixed.sh [target ...]   # targets: pooling compare seeds alone figures (default: all)
#
# About 3 hours on a 2-core CPU; reruns reuse finished runs. Needs `make setup-text`.
set -euo pipefail
cd "$(dirname "$0")/.."
PFEDLORA=${PFEDLORA:-.venv/bin/pfedlora}
export HF_HUB_OFFLINE=1
CONFIG=(--config examples/kjv-mixed.toml)
# Training alone runs one phase: it gets the steps pFedLoRA makes in its two.
FAIR=(--set standalone:train.local_steps=16)
# The methods within two points of the leader at seed 0, which get seeds 1 and 2 (see results-text.md):
# training alone 83.17%, pFedLoRA-branch 83.08%, FedGH 81.55% (FedKD 80.76% is 2.4 points behind).
CLOSEST=${CLOSEST:-pfedlora,standalone,fedgh}
MINILM_ALONE='federation.architectures=["minilm-l2","minilm-l2","minilm-l4","minilm-l4","minilm-l6","minilm-l6","minilm-l2","minilm-l2","minilm-l4","minilm-l4"]'
SMOLLM2_ALONE='federation.architectures=["smollm2-l8","smollm2-l8","smollm2-l16","smollm2-l16","smollm2-l8","smollm2-l8","smollm2-l16","smollm2-l16","smollm2-l8","smollm2-l8"]'

pooling() {  # SmolLM2's pooled feature, chosen on a validation split by training alone
  "$PFEDLORA" tune -q "${CONFIG[@]}" -a standalone -x model.pooling=mean,last \
    --set federation.architectures=smollm2-l8,smollm2-l16 --set federation.num_clients=10 \
    --set federation.sample_fraction=1 --set federation.rounds=6 --set federation.eval_every=3 \
    --set data.validation_fraction=0.1 --set train.local_steps=16 --out runs/text-mixed-pooling
}
compare() {  # every method, seed 0
  "$PFEDLORA" compare -q "${CONFIG[@]}" -a pfedlora,standalone,lg-fedavg,fedgh,fedproto,fml,fedkd,fedapen \
    -p branch,head "${FAIR[@]}" --seeds 0 --jobs 2 --workers 1 --out runs/text-mixed
}
seeds() {  # the closest methods, seeds 1 and 2 (seed 0 is reused)
  "$PFEDLORA" compare -q "${CONFIG[@]}" -a "$CLOSEST" -p branch "${FAIR[@]}" --seeds 0,1,2 \
    --jobs 2 --workers 1 --out runs/text-mixed
}
alone() {  # pFedLoRA in a federation of one family: the same client ids hold the same books and models
  for family in minilm smollm2; do
    if [ "$family" = minilm ]; then archs=$MINILM_ALONE; else archs=$SMOLLM2_ALONE; fi
    "$PFEDLORA" compare -q "${CONFIG[@]}" -a pfedlora -p branch --set "$archs" --seeds 0 \
      --workers 2 --out "runs/text-$family-alone"
  done
}
figures() {  # every method at seed 0, then the closest three at seeds 0-2 (finished runs are only read)
  mkdir -p docs/figures
  "$PFEDLORA" compare -q "${CONFIG[@]}" -a pfedlora,standalone,lg-fedavg,fedgh,fedproto,fml,fedkd,fedapen \
    -p branch,head "${FAIR[@]}" --seeds 0 --jobs 2 --workers 1 --out runs/text-mixed > /dev/null
  for name in accuracy_per_round accuracy_vs_megabytes accuracy_vs_tflops; do
    cp "runs/text-mixed/$name.png" "docs/figures/kjv-mixed-${name//_/-}.png"
  done
  seeds > /dev/null
  for name in accuracy_per_round accuracy_vs_tflops; do
    cp "runs/text-mixed/$name.png" "docs/figures/kjv-mixed-seeds-${name//_/-}.png"
  done
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(pooling compare seeds alone figures)
for target in "${targets[@]}"; do "$target"; done
