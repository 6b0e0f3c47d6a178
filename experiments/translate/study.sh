#!/usr/bin/env bash
# The translator study behind docs/RESULTS.md (section "Translators"), end to end:
#   data -> translators -> embedder without translated views -> translator eval (PSNR, SSIM,
#   segmentation, FID on that embedder's features) -> embedders with each translator's views
#   -> checkpoint selection by validation R@1 -> embedder with the selected checkpoint
#   -> Optuna score-fusion ensemble on the test split -> docs tables and grids.
#
#   experiments/translate/study.sh [demo|uavsar|all]      (default: all)
#
# Every step is skipped when its output exists, so an interrupted study resumes. CPU sizes
# (64 px translator crops, ngf/ndf 16, minutes per model on 2 cores) are in the JSON files;
# the reference sizes (256 px, ngf 64) are translate_{pix2pix,cyclegan,segcyclegan}.json.
# The UAVSAR half needs ../shared/data/real/uavsar-nc and is skipped without it.
set -euo pipefail
cd "$(dirname "$0")/../.."
CMPC=${CMPC:-.venv/bin/cmpc}
T=experiments/translate
WHICH=${1:-all}

say() { printf '\n[study %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
# run_if_missing OUTPUT CMD...: run CMD unless OUTPUT exists
run_if_missing() { local out=$1; shift; if [[ -e $out ]]; then say "skip (exists): $out"; else say "$*"; "$@"; fi; }

translator() {  # translator EXPERIMENT: train (continues an interrupted run; returns at once when finished)
  say "$CMPC translate train $T/$1.json"; "$CMPC" translate train "$T/$1.json" > /dev/null
}

evaluate() {  # evaluate EXPERIMENT FID_EMBEDDER: PSNR/SSIM/segmentation/FID of the last checkpoint
  if ! compgen -G "reports/$1/translate/*.json" > /dev/null; then
    say "$CMPC translate eval $T/$1.json (FID-emb features: $2)"
    "$CMPC" translate eval "$T/$1.json" --set "translate.fid_embedder=$2" > /dev/null
  fi
}

embedder() {  # embedder EXPERIMENT: train (coarse retrieval only; the refiner is off)
  run_if_missing "runs/$1/emb_best.pt" "$CMPC" train emb "$T/$1.json"
}

embedder_as() {  # embedder_as RUN EXPERIMENT [--set ...]: EXPERIMENT's embedder, renamed RUN, with overrides
  local run=$1 file=$2; shift 2
  run_if_missing "runs/$run/emb_best.pt" "$CMPC" train emb "$T/$file.json" --set "name=$run" "$@"
}

selected_embedder() {  # selected_embedder DATASET: embedder with the checkpoint `translate select` picked
  local ds=$1
  run_if_missing "reports/translate_${ds}_select/translate_select.json" "$CMPC" translate select "$T/translate_${ds}_select.json"
  local best
  best=$(.venv/bin/python -c "import json,sys; print(json.load(open(sys.argv[1]))['best'])" "reports/translate_${ds}_select/translate_select.json")
  if cmp -s "$best" "$(dirname "$best")/last.pt"; then
    say "selection picked the last checkpoint: translate_${ds}_emb_cyclegan already uses it (no extra run)"
    return
  fi
  embedder_as "translate_${ds}_emb_selected" "translate_${ds}_emb_none" --set "translate.views=[\"$best\"]"
}

ensemble() {  # ensemble DATASET SUFFIX MEMBER_RUN...: fuse the members, report the no-translator run beside them
  local ds=$1 sfx=$2; shift 2
  local members=() seed=${sfx#_s}
  for m in "$@"; do [[ -e runs/$m$sfx/emb_best.pt ]] && members+=("runs/$m$sfx/emb_best.pt"); done
  run_if_missing "reports/translate_${ds}_ensemble$sfx/translate_ensemble.json" \
    "$CMPC" translate ensemble "$T/translate_${ds}_ensemble.json" --set "name=translate_${ds}_ensemble$sfx" \
    --set "train.seed=${seed:-0}" --members "${members[@]}" --references "runs/translate_${ds}_emb_none$sfx/emb_best.pt" > /dev/null
}

seeds() {  # seeds DATASET TRANSLATOR...: the without/with/ensemble comparison again for seeds 0, 1, 2
  # (same data, translators and validation hold-out; only the embedders' initialisation and
  # sampling change): the spread says which differences are larger than the seed noise.
  local ds=$1; shift
  for s in 0 1 2; do
    for e in none "$@"; do
      if [[ $s == 0 ]]; then
        [[ -e runs/translate_${ds}_emb_${e}_s0 ]] || ln -s "translate_${ds}_emb_$e" "runs/translate_${ds}_emb_${e}_s0"
      else
        embedder_as "translate_${ds}_emb_${e}_s$s" "translate_${ds}_emb_$e" --set "train.seed=$s"
      fi
    done
    ensemble "$ds" "_s$s" $(printf "translate_${ds}_emb_%s " "$@")
  done
}

control() {  # control DATASET N: fuse N no-translator embedders of different seeds (the fair baseline
  # for an ensemble of N translator embedders: how much is model ensembling alone)
  local ds=$1 n=$2 s
  for s in 0 1 2; do
    local members=() k
    for ((k = 0; k < n; k++)); do members+=("runs/translate_${ds}_emb_none_s$(((s + k) % 3))/emb_best.pt"); done
    run_if_missing "reports/translate_${ds}_control_s$s/translate_ensemble.json" \
      "$CMPC" translate ensemble "$T/translate_${ds}_ensemble.json" --set "name=translate_${ds}_control_s$s" --members "${members[@]}" > /dev/null
    ((n < 3)) || break  # with 3 seeds, every rotation of 3 members is the same ensemble
  done
}

study_demo() {
  say "demo world: data"
  run_if_missing data/demo/world/world.json "$CMPC" data synth experiments/demo.json > /dev/null
  run_if_missing data/demo/dataset/dataset.json "$CMPC" data tile experiments/demo.json > /dev/null
  local ts=(translate_demo_pix2pix translate_demo_pix2pix_opt2sar translate_demo_cyclegan translate_demo_segcyclegan)
  for t in "${ts[@]}"; do translator "$t"; done
  embedder translate_demo_emb_none
  for t in "${ts[@]}"; do evaluate "$t" runs/translate_demo_emb_none/emb_best.pt; done
  for e in pix2pix cyclegan segcyclegan; do embedder "translate_demo_emb_$e"; done
  selected_embedder demo
  ensemble demo "" translate_demo_emb_pix2pix translate_demo_emb_cyclegan translate_demo_emb_segcyclegan translate_demo_emb_selected
  seeds demo pix2pix cyclegan segcyclegan
  control demo 3
}

study_uavsar() {
  if [[ ! -d ../shared/data/real/uavsar-nc ]]; then say "skip UAVSAR: ../shared/data/real/uavsar-nc is absent"; return; fi
  say "UAVSAR: data"
  run_if_missing data/uavsar/dataset/dataset.json "$CMPC" data tile experiments/uavsar.json > /dev/null
  local ts=(translate_uavsar_pix2pix translate_uavsar_pix2pix_opt2sar translate_uavsar_cyclegan)
  for t in "${ts[@]}"; do translator "$t"; done
  embedder translate_uavsar_emb_none
  for t in "${ts[@]}"; do evaluate "$t" runs/translate_uavsar_emb_none/emb_best.pt; done
  for e in pix2pix cyclegan; do embedder "translate_uavsar_emb_$e"; done
  selected_embedder uavsar
  ensemble uavsar "" translate_uavsar_emb_pix2pix translate_uavsar_emb_cyclegan translate_uavsar_emb_selected
  seeds uavsar pix2pix cyclegan
  control uavsar 2
}

case $WHICH in
  demo) study_demo ;;
  uavsar) study_uavsar ;;
  all) study_demo; study_uavsar ;;
  *) echo "usage: $0 [demo|uavsar|all]" >&2; exit 2 ;;
esac
say "tables -> docs/RESULTS.md (Translators)"
.venv/bin/python -m cmpc.translate.report --write-results docs/RESULTS.md
