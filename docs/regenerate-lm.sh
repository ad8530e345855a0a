#!/usr/bin/env bash
# Regenerates docs/results-lm.md's runs: every language-modeling method on SmolLM2 clients of the KJV by
# book (examples/kjv-lm.toml) and of Debian's fortunes by category (examples/fortunes-lm.toml), seed 0; the
# closest methods (and pFedLoRA and training alone) at seeds 1 and 2; copies the figures into docs/figures.
#
#   bash docs/regenerate-lm.sh [target ...]   # targets: kjv fortunes kjv-seeds fortunes-seeds steps figures
#
# On 2 cores: about 25 minutes a corpus at seed 0 with AMX (Intel Xeon), 60 to 90 without (AMD EPYC); the
# seeds twice that. Reruns reuse finished runs.
# Needs `make setup-text`. The methods that train one adapter in one phase get pFedLoRA's two phases' steps.
# The page's runs are bf16 on every machine (the examples' precision "auto" would pick fp32 on a CPU without
# AMX, where it is faster).
set -euo pipefail
cd "$(dirname "$0")/.."
PFEDLORA=${PFEDLORA:-.venv/bin/pfedlora}
export HF_HUB_OFFLINE=1
ALL=pfedlora,standalone,zero-shot,fedit,ffa-lora,fedsa-lora,hetlora,flexlora,flora
ONE_PHASE=" standalone fedit ffa-lora fedsa-lora hetlora flexlora flora "
BF16=(--set train.precision=bf16)
fair() {  # methods (comma-separated): pFedLoRA's two phases' steps for each one-phase method among them
  FAIR=()
  local method
  for method in ${1//,/ }; do
    [[ $ONE_PHASE == *" $method "* ]] && FAIR+=(--set "$method:train.local_steps=12")
  done
  return 0
}
# The three methods closest to the best at seed 0 (see results-lm.md), with pFedLoRA and training alone.
KJV_CLOSEST=${KJV_CLOSEST:-pfedlora,standalone,flexlora,fedit,hetlora}
FORTUNES_CLOSEST=${FORTUNES_CLOSEST:-pfedlora,standalone,flexlora,fedit,hetlora}

every_method() {  # corpus: every method, seed 0
  fair "$ALL"
  "$PFEDLORA" compare -q --config "examples/$1-lm.toml" -a "$ALL" "${FAIR[@]}" "${BF16[@]}" --seeds 0 \
    --jobs 2 --workers 1 --out "runs/lm-$1"
}
closest() {  # corpus, methods: seeds 0-2 (seed 0 is reused)
  fair "$2"
  "$PFEDLORA" compare -q --config "examples/$1-lm.toml" -a "$2" "${FAIR[@]}" "${BF16[@]}" --seeds 0,1,2 \
    --jobs 2 --workers 1 --out "runs/lm-$1"
}
kjv() { every_method kjv; }
fortunes() { every_method fortunes; }
kjv-seeds() { closest kjv "$KJV_CLOSEST"; }
steps() {  # KJV, seed 0: pFedLoRA at 12 steps per phase against training alone at 24 (the same passes)
  "$PFEDLORA" compare -q --config examples/kjv-lm.toml -a pfedlora,standalone "${BF16[@]}" \
    --set train.local_steps=12 --set standalone:train.local_steps=24 --seeds 0 --jobs 2 --workers 1 \
    --out runs/lm-kjv-steps
}
fortunes-seeds() { closest fortunes "$FORTUNES_CLOSEST"; }
figures() {  # every method at seed 0, then the closest at seeds 0-2 (finished runs are only read)
  mkdir -p docs/figures
  for corpus in kjv fortunes; do
    every_method "$corpus" > /dev/null
    for name in perplexity_per_round perplexity_vs_megabytes perplexity_vs_tflops; do
      cp "runs/lm-$corpus/$name.png" "docs/figures/lm-$corpus-${name//_/-}.png"
    done
    if [ "$corpus" = kjv ]; then closest kjv "$KJV_CLOSEST"; else closest fortunes "$FORTUNES_CLOSEST"; fi \
      > /dev/null
    for name in perplexity_per_round perplexity_vs_megabytes perplexity_vs_tflops; do
      cp "runs/lm-$corpus/$name.png" "docs/figures/lm-$corpus-seeds-${name//_/-}.png"
    done
  done
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(kjv fortunes kjv-seeds fortunes-seeds steps figures)
for target in "${targets[@]}"; do "$target"; done
