#!/usr/bin/env bash
# Regenerates docs/results-lm.md's runs: every language-modeling method on SmolLM2 clients of the KJV by
# book (examples/kjv-lm.toml), seed 0, and copies the figures into docs/figures.
#
#   bash docs/regenerate-lm.sh        # about 25 minutes on a 2-core CPU; reruns reuse finished runs
#
# Needs `make setup-text`. The methods that train one adapter in one phase get pFedLoRA's two phases' steps.
set -euo pipefail
cd "$(dirname "$0")/.."
PFEDLORA=${PFEDLORA:-.venv/bin/pfedlora}
export HF_HUB_OFFLINE=1
SINGLE=(standalone fedit ffa-lora fedsa-lora hetlora flexlora flora)
FAIR=()
for method in "${SINGLE[@]}"; do FAIR+=(--set "$method:train.local_steps=12"); done
"$PFEDLORA" compare -q --config examples/kjv-lm.toml \
  -a pfedlora,standalone,zero-shot,fedit,ffa-lora,fedsa-lora,hetlora,flexlora,flora \
  "${FAIR[@]}" --jobs 2 --workers 1 --out runs/lm-kjv
mkdir -p docs/figures
for name in perplexity_per_round perplexity_vs_megabytes perplexity_vs_tflops; do
  cp "runs/lm-kjv/$name.png" "docs/figures/lm-kjv-${name//_/-}.png"
done
