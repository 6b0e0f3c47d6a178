#!/usr/bin/env bash
# The Sentinel-1 -> Sentinel-2 model from a fresh clone: `make sentinel` (needs ../shared/data/real/sentinel-la).
# Tiles sentinel-la into its blocks, trains three seeds of experiments/sentinel.json (embedder
# + refiner), evaluates each on the test blocks (reported once) and on BigEarthNet 60-way, and
# writes docs/real.json. About 40-50 min per seed on the 2-core machine; every step resumes or
# skips when already done. Then the three seeds are fused by score into one embedder
# (runs/sentinel_fused/emb_best.pt, `cmpc model fuse`; chosen on the validation block:
# experiments/sentinel/screen_fusion.py), tested once and checked on BigEarthNet. That fused
# checkpoint was weights/sentinel/ until 2026-12-01, with seed 0's dense descriptor alone as the
# scene aligner (`cmpc model aligner`), a scene-graph GNN trained for the fused embedder on the
# training blocks and the scene decisions (verify, gnn+verify) calibrated with it at the reference
# stride with the whole-map dense search (experiments/sentinel/scene_model.sh). The card now ships
# the same recipe trained on registered pairs (make sentinel-registered, run after this: it uses
# the 32 px test tilings and the MI record made here); this script measures the grid-trained
# model, the baseline that one is compared with.
# A smoke run of the whole chain (minutes, numbers meaningless): SET="--set train.epochs=1
# --set refine.epochs=1 --set refine.align_steps=20" GNN_SCENES=3 CAL_SCENES=4 CAL_EVERY=20 make sentinel
# (SET is added to every training and test step; the scene counts go to scene_model.sh; CAL_EVERY
# calibrates the CFOG gate on every N-th validation query only).
set -euo pipefail
cd "$(dirname "$0")/../.."
CMPC=".venv/bin/cmpc"
EXP=experiments/sentinel.json
read -r -a SET <<< "${SET:-}"
[ -d ../shared/data/real/sentinel-la ] || { echo "error: ../shared/data/real/sentinel-la is missing" >&2; exit 2; }
[ -f data/sentinel-la/dataset/dataset.json ] || $CMPC data tile $EXP
for seed in ${SEEDS:-0 1 2}; do
  name=sentinel; [ "$seed" -gt 0 ] && name=sentinel_s$seed
  $CMPC train emb $EXP --set name=$name --set train.seed=$seed "${SET[@]}"
  # seeds > 0 reuse seed 0's fine-alignment descriptor (it depends on the data, not on the embedder)
  align=(); [ "$seed" -gt 0 ] && align=(--set refine.align_from=runs/sentinel/refiner.pt)
  $CMPC train refine $EXP --set name=$name "${align[@]}" "${SET[@]}"
  $CMPC test $EXP --set name=$name "${align[@]}" "${SET[@]}"
  for fit in resize native; do
    $CMPC eval pairs $EXP --set name=$name --pairs bigearthnet --sar-bands VH --sar-scale amplitude --fit $fit
  done
done
mkdir -p runs/sentinel_fused
[ -f runs/sentinel_fused/emb_best.pt ] || $CMPC model fuse runs/sentinel_fused/emb_best.pt runs/sentinel/emb_best.pt runs/sentinel_s1/emb_best.pt runs/sentinel_s2/emb_best.pt
.venv/bin/python experiments/sentinel/screen_fusion.py runs/sentinel/emb_best.pt runs/sentinel_s1/emb_best.pt runs/sentinel_s2/emb_best.pt > runs/sentinel_fused/validation_screen.json
$CMPC test $EXP --set name=sentinel_fused --set refine.enabled=false "${SET[@]}"
for fit in resize native; do
  $CMPC eval pairs $EXP --set name=sentinel_fused --pairs bigearthnet --sar-bands VH --sar-scale amplitude --fit $fit
done
[ -f runs/sentinel_fused/refiner.pt ] || $CMPC model aligner runs/sentinel/refiner.pt runs/sentinel_fused/refiner.pt
bash experiments/sentinel/scene_model.sh  # scene-graph GNN + both scene decisions -> runs/sentinel_fused/scene_gnn
# CFOG fine alignment of the fused model (no GNN, nothing trained; what the card ships): its
# settings and peak threshold chosen on the validation block against the training map
# (experiments/sentinel/calibrate_cfog.py; ZNCC scores chosen over plain correlation there by the
# same criterion), then the test blocks once -> reports/sentinel_fused_zncc
CFOG=(--set refine.fine_top=20 --set refine.cfog_sigma=1.5 --set refine.align_score=zncc)
# (docs/sentinel_cfog_calibration.json is the grid-trained card's copy of runs/sentinel_fused/cfog_calibration.json)
[ -f runs/sentinel_fused/cfog_calibration.json ] || .venv/bin/python experiments/sentinel/calibrate_cfog.py \
  --checkpoint runs/sentinel_fused/emb_best.pt --out runs/sentinel_fused/cfog_calibration.json --every "${CAL_EVERY:-1}" "${CFOG[@]}"
thr=$(.venv/bin/python -c "import json; print(json.load(open('runs/sentinel_fused/cfog_calibration.json'))['align_min_peak'])")
[ -f reports/sentinel_fused_zncc/metrics.json ] || $CMPC test $EXP --set name=sentinel_fused --set eval.out=reports/sentinel_fused_zncc \
  --set refine.aligner=cfog --set refine.gate=config --set refine.align_min_peak="$thr" "${CFOG[@]}" "${SET[@]}"
# The grid-trained fused model with the card's refine settings and its own gate on the test blocks
# tiled at the card's reference grid (inputs.ref_stride_m: every 32 px; a quarter as many
# non-aligned queries per reference, so about as many as at 64 px) -> reports/sentinel_card32
# (it was the card as shipped when these reports were first made)
[ -f data/sentinel-la32/dataset/dataset.json ] || $CMPC data tile $EXP --set tile.stride_px=32 --set tile.non_aligned_per_ref=0.25 --set data.root=data/sentinel-la32/dataset
card="$(.venv/bin/python -c "import json; r=json.load(open('weights/sentinel/card.json'))['experiment']['refine']; print(' '.join(f'--set refine.{k}={v}' for k, v in r.items() if k not in ('enabled', 'align_min_peak')))") --set refine.align_min_peak=$thr"
[ -f reports/sentinel_card32/metrics.json ] || $CMPC test $EXP --checkpoint runs/sentinel_fused/emb_best.pt --set name=sentinel_card32 \
  --set data.root=data/sentinel-la32/dataset --set eval.out=reports/sentinel_card32 $card "${SET[@]}"
# the same answers also against each test file's measured co-registration (MI; a second reading)
.venv/bin/python experiments/sentinel/patch_truth.py reports/sentinel_card32 --out docs/sentinel_patch_truth.json > /dev/null
# The same model on the test blocks with each SAR file moved by its measured co-registration
# before tiling (tile.register): the truth follows what the pixels show. CFOG (cells within 1.1 px
# of the file's shift, against 2.7 px for MI's halves) is the primary record; MI, which shares
# nothing with the card's CFOG aligner, is the independent check. Nothing is trained or chosen here.
[ -f runs/sentinel_coregistration_cfog.json ] || $CMPC data coregistration ../shared/data/real/sentinel-la --method cfog --out runs/sentinel_coregistration_cfog.json > /dev/null
[ -f runs/sentinel_coregistration_mi.json ] || $CMPC data coregistration ../shared/data/real/sentinel-la --out runs/sentinel_coregistration_mi.json > /dev/null
for reg in cfog mi; do
  suffix=reg; [ $reg = mi ] && suffix=reg_mi
  root=data/sentinel-la32$suffix/dataset
  [ -f $root/dataset.json ] || $CMPC data tile $EXP --set tile.stride_px=32 --set tile.non_aligned_per_ref=0.25 --set data.root=$root \
    --set tile.register=runs/sentinel_coregistration_$reg.json
  [ -f reports/sentinel_card32$suffix/metrics.json ] || $CMPC test $EXP --checkpoint runs/sentinel_fused/emb_best.pt --set name=sentinel_card32$suffix \
    --set data.root=$root --set eval.out=reports/sentinel_card32$suffix $card "${SET[@]}"
done
.venv/bin/python experiments/sentinel/collect.py --out docs/real.json
.venv/bin/python experiments/sentinel/registered.py > /dev/null  # docs/sentinel_registered.json (make scenes adds the scene rows)
