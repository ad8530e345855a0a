#!/usr/bin/env bash
# Regenerates the runs behind docs/results.md: the validation search at N=100, C=10%, 5 classes, then the
# tuned comparison at all six settings, and copies the tables' figures into docs/figures.
#
#   bash docs/regenerate.sh            # everything, one setting after another (hours on a 2-core CPU)
#   bash docs/regenerate.sh n10-c100-k2  # one setting's comparison only (JOBS=2: two runs at once)
#   bash docs/regenerate.sh seeds        # every method (pFedLoRA: both placements) at N=100, C=10%,
#                                        # 5 classes, seeds 0, 1, 2 (section "Three seeds"); JOBS=2 runs
#                                        # two at once; SEEDS=0,1 runs (or tables) fewer seeds
#   bash docs/regenerate.sh seeds-after-download  # the same, scored right after the download
#   bash docs/regenerate.sh seeds-100-rounds      # pFedLoRA-branch and FedAPEN, 100 rounds, three seeds
#   bash docs/regenerate.sh seeds-n100-c10-k2     # three seeds, longer, in another setting (also
#                                                 # seeds-n50-c20-k2, seeds-n50-c20-k5,
#                                                 # seeds-n10-c100-k5, seeds-n10-c100-k2; SEED_SETTINGS)
#   bash docs/regenerate.sh search-new   # section 6: the learning-rate search of the methods added since
#   bash docs/regenerate.sh new          # section 6: their 60-round comparison at N=100, C=10%, 5 classes
#   bash docs/regenerate.sh seeds-new    # section 6: seeds 0-2 of those within two points of the leader
#   bash docs/regenerate.sh scale        # pFedLoRA-branch, standalone, LG-FedAvg, FedAPEN at N=1,000, C=1%,
#                                        # Dirichlet (section "A thousand clients")
#
# Every step reuses what already finished under runs/, so an interrupted run of this script resumes.
# To use more cores, add `--jobs 2` (or more) to a compare command: its runs go side by side, each with its
# share of the cores. A comparison directory has one writer at a time (a second compare there is refused);
# runs made elsewhere with the same settings can be copied into it, and a compare there reuses them.
set -euo pipefail
cd "$(dirname "$0")/.."
PFEDLORA=${PFEDLORA:-pfedlora}

# The pages' runs used the foreach SGD kernel (bit for bit the per-parameter update; the default until the
# fused kernel replaced it): every command here keeps the kernel those runs used.
KERNEL=(--set train.sgd_kernel=foreach)

# The values the search chose (docs/results.md, section 1), passed to each method by compare.
TUNED=(
  --set pfedlora:train.local_epochs=3 --set pfedlora:train.lr=0.03
  --set pfedlora:adapter.epochs=2 --set pfedlora:adapter.rank=8
  --set standalone:train.local_epochs=3 --set standalone:train.lr=0.03
  --set lg-fedavg:train.local_epochs=3 --set lg-fedavg:train.lr=0.03
  --set fml:train.local_epochs=3 --set fml:train.lr=0.03 --set fml:fml.alpha=0.5
  --set fedkd:train.local_epochs=3 --set fedkd:train.lr=0.03
  --set fedgh:train.local_epochs=3 --set fedgh:train.lr=0.03 --set fedgh:fedgh.server_lr=0.1
  --set fedapen:train.local_epochs=3 --set fedapen:train.lr=0.03
  --set fedapen:fedapen.lambda_lr=0.01
  --set fedproto:train.local_epochs=3 --set fedproto:train.lr=0.03
)

# name: clients, fraction sampled per round, classes per client, rounds, evaluate every, target accuracy
declare -A SETTINGS=(
  [n100-c10-k5-tuned]="100 0.1 5 60 5 0.8"
  [n100-c10-k2]="100 0.1 2 30 5 0.9"
  [n50-c20-k5]="50 0.2 5 25 5 0.8"
  [n50-c20-k2]="50 0.2 2 20 2 0.9"
  [n10-c100-k5]="10 1 5 8 1 0.8"
  [n10-c100-k2]="10 1 2 2 1 0.9"
)

search() {
  "$PFEDLORA" tune -a pfedlora,standalone,lg-fedavg,fml,fedkd,fedgh,fedapen -p branch \
    -x train.local_epochs=1,2,3 -x train.lr=0.01,0.03 \
    -x pfedlora:adapter.epochs=1,2 -x pfedlora:adapter.rank=8,16 -x fml:fml.alpha=0.5,0.3 \
    -x fedgh:fedgh.server_lr=0.01,0.1 -x fedapen:fedapen.lambda_lr=0.01,0.1 \
    --set federation.rounds=30 --set data.validation_fraction=0.1 "${KERNEL[@]}" --out runs/tune-n100-c10-k5
}

comparison() {
  local name=$1 clients fraction classes rounds every target
  read -r clients fraction classes rounds every target <<<"${SETTINGS[$name]}"
  "$PFEDLORA" compare -q \
    --set federation.num_clients="$clients" --set federation.sample_fraction="$fraction" \
    --set data.classes_per_client="$classes" --set federation.rounds="$rounds" \
    --set federation.eval_every="$every" "${TUNED[@]}" "${KERNEL[@]}" --target "$target" \
    --jobs "${JOBS:-1}" --out "runs/compare-$name"
  for plot in accuracy_per_round accuracy_vs_megabytes accuracy_vs_tflops; do
    cp "runs/compare-$name/$plot.png" "docs/figures/$name-${plot//_/-}.png"
  done
}

# Every method at N=100, C=10%, 5 classes, seeds 0-2, scored as the paper's authors do (after training).
seeds() {
  "$PFEDLORA" compare -q -a fedkd,pfedlora,standalone,lg-fedavg,fml,fedgh,fedapen,fedproto -p branch,layers \
    --seeds "${SEEDS:-0,1,2}" --jobs "${JOBS:-1}" \
    --set federation.rounds=60 --set federation.eval_every=5 "${TUNED[@]}" "${KERNEL[@]}" --target 0.8 \
    --out runs/seeds-n100-c10-k5
  for plot in accuracy_per_round accuracy_vs_tflops; do
    cp "runs/seeds-n100-c10-k5/$plot.png" "docs/figures/seeds-n100-c10-k5-${plot//_/-}.png"
  done
}

# The same runs scored as HtFLlib does: every client first takes in the round's broadcast (training is bit
# for bit the same). Training alone, FML and FedKD predict with the private model only, which a download
# does not touch, so their numbers cannot change and they are left out.
seeds_after_download() {
  local methods=fedapen,fedgh,fedproto,pfedlora,lg-fedavg
  mapfile -t tuned < <(tuned_for "$methods")
  "$PFEDLORA" compare -q -a "$methods" -p branch,layers \
    --seeds "${SEEDS:-0,1,2}" --jobs "${JOBS:-1}" --set federation.evaluate=after-download \
    --set federation.rounds=60 --set federation.eval_every=5 "${tuned[@]}" "${KERNEL[@]}" --target 0.8 \
    --out runs/seeds-n100-c10-k5-after-download
  for plot in accuracy_per_round accuracy_vs_tflops; do
    cp "runs/seeds-n100-c10-k5-after-download/$plot.png" \
      "docs/figures/seeds-n100-c10-k5-after-download-${plot//_/-}.png"
  done
}

# The two that tie at 60 rounds, run to 100 (FedAPEN still rose at round 60).
seeds_long() {
  local methods=pfedlora,fedapen
  mapfile -t tuned < <(tuned_for "$methods")
  "$PFEDLORA" compare -q -a "$methods" -p branch --seeds "${SEEDS:-0,1,2}" --jobs "${JOBS:-1}" \
    --set federation.rounds=100 --set federation.eval_every=5 "${tuned[@]}" "${KERNEL[@]}" --target 0.8 \
    --out runs/seeds-n100-c10-k5-100-rounds
  for plot in accuracy_per_round accuracy_vs_tflops; do
    cp "runs/seeds-n100-c10-k5-100-rounds/$plot.png" "docs/figures/seeds-n100-c10-k5-100-rounds-${plot//_/-}.png"
  done
}

# Three seeds in the other settings, for pFedLoRA-branch and the baselines that came closest to it with
# one seed (section 3), with longer schedules: name: clients, fraction, classes, rounds, evaluate every,
# target accuracy, methods.
declare -A SEED_SETTINGS=(
  [n100-c10-k2]="100 0.1 2 60 5 0.9 pfedlora,lg-fedavg"
  [n50-c20-k2]="50 0.2 2 40 4 0.9 pfedlora,standalone"
  [n50-c20-k5]="50 0.2 5 40 4 0.8 pfedlora,fedapen,standalone"
  [n10-c100-k5]="10 1.0 5 8 1 0.8 pfedlora,fml"
  [n10-c100-k2]="10 1.0 2 5 1 0.9 pfedlora,standalone"
  [n10-c100-k5-fml]="10 1.0 5 12 1 0.8 fml"  # FML still rose at round 8 of n10-c100-k5
)

seeds_in() {
  local name=$1 clients fraction classes rounds every target methods
  read -r clients fraction classes rounds every target methods <<<"${SEED_SETTINGS[$name]}"
  mapfile -t tuned < <(tuned_for "$methods")
  "$PFEDLORA" compare -q -a "$methods" -p branch --seeds "${SEEDS:-0,1,2}" --jobs "${JOBS:-1}" \
    --set federation.num_clients="$clients" --set federation.sample_fraction="$fraction" \
    --set data.classes_per_client="$classes" --set federation.rounds="$rounds" \
    --set federation.eval_every="$every" "${tuned[@]}" "${KERNEL[@]}" --target "$target" \
    --out "runs/seeds-$name"
  for plot in accuracy_per_round accuracy_vs_tflops; do
    cp "runs/seeds-$name/$plot.png" "docs/figures/seeds-$name-${plot//_/-}.png"
  done
}

# The TUNED overrides of the algorithms named (comma-separated) only.
tuned_for() {
  local algorithms=",$1," i
  for ((i = 1; i < ${#TUNED[@]}; i += 2)); do
    [[ $algorithms == *",${TUNED[i]%%:*},"* ]] && printf '%s\n' --set "${TUNED[i]}"
  done
}

scale() {
  local methods=pfedlora,standalone,lg-fedavg,fedapen
  mapfile -t tuned < <(tuned_for "$methods")
  "$PFEDLORA" compare -q -a "$methods" -p branch \
    --set federation.num_clients=1000 --set federation.sample_fraction=0.01 \
    --set data.partition=dirichlet --set federation.rounds=500 --set federation.eval_every=25 \
    --set federation.eval_sample=100 "${tuned[@]}" "${KERNEL[@]}" --target "${SCALE_TARGET:-0.7}" \
    --out runs/scale-n1000-c1-dirichlet
  for plot in accuracy_per_round accuracy_vs_megabytes accuracy_vs_tflops; do
    cp "runs/scale-n1000-c1-dirichlet/$plot.png" "docs/figures/scale-n1000-c1-dirichlet-${plot//_/-}.png"
  done
}

# The methods added after sections 1-5 (docs/results.md, section 6): a shorter search (the learning rate at
# 3 epochs, 15 rounds), then the 60-round comparison of section 2 at the chosen values, seed 0.
NEW_METHODS=fd,fedtgp,fedgen,fedssa,pfedes,pfedafm,pfedmoe,fedmrl,fedl2g-feat,fedl2g-logit
search_new() {
  "$PFEDLORA" tune -q -a "$NEW_METHODS" -x train.lr=0.01,0.03 --set train.local_epochs=3 \
    --set federation.rounds=15 --set data.validation_fraction=0.1 "${KERNEL[@]}" --out runs/tune-new-n100-c10-k5
}
new_tuned() {  # the chosen values (3 epochs, lr 0.03) of the methods named (comma-separated)
  local method
  for method in ${1//,/ }; do
    printf '%s\n' --set "$method:train.local_epochs=3" --set "$method:train.lr=0.03"
  done
}
new() {
  mapfile -t tuned < <(new_tuned "$NEW_METHODS")
  "$PFEDLORA" compare -q -a "$NEW_METHODS" "${tuned[@]}" --set federation.rounds=60 \
    --set federation.eval_every=5 "${KERNEL[@]}" --target 0.8 --out runs/compare-n100-c10-k5-new
  for plot in accuracy_per_round accuracy_vs_megabytes accuracy_vs_tflops; do
    cp "runs/compare-n100-c10-k5-new/$plot.png" "docs/figures/new-n100-c10-k5-${plot//_/-}.png"
  done
}
# Seeds 0-2 for the new methods within two points of the leader at seed 0 (FedMRL, pFedMoE; seed 0 is the
# run of `new`, copied in when it has finished there).
NEW_CLOSEST=${NEW_CLOSEST:-pfedmoe,fedmrl}
seeds_new() {
  local method
  for method in ${NEW_CLOSEST//,/ }; do
    local one=runs/compare-n100-c10-k5-new/$method seeds=runs/seeds-n100-c10-k5-new/$method
    if [[ -f $one/summary.json && ! -e $seeds/seed-0 ]]; then
      mkdir -p "$seeds" && cp -r "$one" "$seeds/seed-0"
    fi
  done
  mapfile -t tuned < <(new_tuned "$NEW_CLOSEST")
  "$PFEDLORA" compare -q -a "$NEW_CLOSEST" "${tuned[@]}" --seeds "${SEEDS:-0,1,2}" --jobs "${JOBS:-1}" \
    --set federation.rounds=60 --set federation.eval_every=5 "${KERNEL[@]}" --target 0.8 \
    --out runs/seeds-n100-c10-k5-new
}

if [[ $# -eq 1 && $1 == search-new ]]; then
  search_new
elif [[ $# -eq 1 && $1 == new ]]; then
  new
elif [[ $# -eq 1 && $1 == seeds-new ]]; then
  seeds_new
elif [[ $# -eq 1 && $1 == seeds ]]; then
  seeds
elif [[ $# -eq 1 && $1 == seeds-after-download ]]; then
  seeds_after_download
elif [[ $# -eq 1 && $1 == seeds-100-rounds ]]; then
  seeds_long
elif [[ $# -eq 1 && $1 == seeds-* && -v "SEED_SETTINGS[${1#seeds-}]" ]]; then
  seeds_in "${1#seeds-}"
elif [[ $# -eq 1 && $1 == scale ]]; then
  scale
elif [[ $# -eq 0 ]]; then
  search
  for name in n100-c10-k5-tuned n100-c10-k2 n50-c20-k5 n50-c20-k2 n10-c100-k5 n10-c100-k2; do
    comparison "$name"
  done
else
  for name in "$@"; do
    [[ -v "SETTINGS[$name]" ]] || {
      echo "unknown setting $name; known: ${!SETTINGS[*]}; or one of: search-new new seeds-new seeds" \
        "seeds-after-download" \
        "seeds-100-rounds" \
        "$(printf 'seeds-%s ' "${!SEED_SETTINGS[@]}")scale" >&2
      exit 2
    }
    comparison "$name"
  done
fi
