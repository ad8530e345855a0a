#!/usr/bin/env bash
# Regenerates docs/results-lm.md's runs: every language-modeling method on SmolLM2 clients of the KJV by
# book (examples/kjv-lm.toml) and of Debian's fortunes by category (examples/fortunes-lm.toml), seed 0; the
# closest methods (and pFedLoRA and training alone) at seeds 1 and 2; three methods on the fortunes run on to
# 12 rounds; copies the figures into docs/figures.
#
#   bash docs/regenerate-lm.sh [target ...]
#   # targets: kjv fortunes kjv-seeds fortunes-seeds steps longer figures (all of them by default)
#
# On 2 cores: about 25 minutes a corpus at seed 0 with AMX (Intel Xeon, bf16), 60 to 90 without (AMD EPYC,
# bf16), about 45 for the fortunes in fp32 on the Xeon without AMX; the seeds twice that; `longer` about 45.
# Reruns reuse finished runs.
# Needs `make setup-text`. The methods that train one adapter in one phase get pFedLoRA's two phases' steps.
# The precision is pinned per corpus, so the page's runs are the same on every machine: the KJV's bf16, the
# fortunes' fp32 (they ran on a CPU without AMX, where fp32 is 1.8x faster; "auto" would pick that there).
set -euo pipefail
cd "$(dirname "$0")/.."
PFEDLORA=${PFEDLORA:-.venv/bin/pfedlora}
export HF_HUB_OFFLINE=1
ALL=pfedlora,standalone,zero-shot,fedit,ffa-lora,fedsa-lora,hetlora,flexlora,flora
ONE_PHASE=" standalone fedit ffa-lora fedsa-lora hetlora flexlora flora "
precision() { [ "$1" = kjv ] && echo bf16 || echo fp32; }  # corpus -> its runs' train.precision
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
  "$PFEDLORA" compare -q --config "examples/$1-lm.toml" -a "$ALL" "${FAIR[@]}" \
    --set "train.precision=$(precision "$1")" --seeds 0 --jobs 2 --workers 1 --out "runs/lm-$1"
}
closest() {  # corpus, methods: seeds 0-2 (seed 0 is reused)
  fair "$2"
  "$PFEDLORA" compare -q --config "examples/$1-lm.toml" -a "$2" "${FAIR[@]}" \
    --set "train.precision=$(precision "$1")" --seeds 0,1,2 --jobs 2 --workers 1 --out "runs/lm-$1"
}
kjv() { every_method kjv; }
fortunes() { every_method fortunes; }
kjv-seeds() { closest kjv "$KJV_CLOSEST"; }
steps() {  # KJV, seed 0: pFedLoRA at 12 steps per phase against training alone at 24 (the same passes)
  "$PFEDLORA" compare -q --config examples/kjv-lm.toml -a pfedlora,standalone \
    --set "train.precision=$(precision kjv)" \
    --set train.local_steps=12 --set standalone:train.local_steps=24 --seeds 0 --jobs 2 --workers 1 \
    --out runs/lm-kjv-steps
}
fortunes-seeds() { closest fortunes "$FORTUNES_CLOSEST"; }
LONGER=${LONGER:-pfedlora,standalone,fedit}
longer() {  # fortunes, seed 0: LONGER's 6-round runs (copied) extended to 12 rounds, two at a time
  local method run
  for method in ${LONGER//,/ }; do
    run=runs/lm-fortunes-12-rounds/$method/seed-0
    [ -d "$run" ] || { mkdir -p "$(dirname "$run")" && cp -r "runs/lm-fortunes/$method/seed-0" "$run"; }
    grep -q '"rounds": 12' "$run/summary.json" 2> /dev/null && continue  # extended already
    OMP_NUM_THREADS=1 "$PFEDLORA" run -q --resume "$run" --rounds 12 --workers 1 > /dev/null &
    [ "$(jobs -rp | wc -l)" -lt 2 ] || wait -n
  done
  wait
  fair "$LONGER"  # the finished runs are only read: the comparison and its figures
  "$PFEDLORA" compare -q --config examples/fortunes-lm.toml -a "$LONGER" "${FAIR[@]}" \
    --set "train.precision=$(precision fortunes)" --set federation.rounds=12 --seeds 0 --jobs 2 --workers 1 \
    --out runs/lm-fortunes-12-rounds
}
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
  longer > /dev/null
  for name in perplexity_per_round perplexity_vs_tflops; do
    cp "runs/lm-fortunes-12-rounds/$name.png" "docs/figures/lm-fortunes-12-rounds-${name//_/-}.png"
  done
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(kjv fortunes kjv-seeds fortunes-seeds steps longer figures)
for target in "${targets[@]}"; do "$target"; done
