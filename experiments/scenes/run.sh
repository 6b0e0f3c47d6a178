#!/usr/bin/env bash
# Scene localization study (docs/RESULTS.md "Scene localization"; `make scenes`).
#
# Synthetic: an 8 km x 8 km test map of 16 unseen 2 km worlds (seeds 7000-7015) and a separate
# 8 km calibration map (seeds 7100-7115: the "training area" of the scene step; neither is seen
# by the embedder or the refiner, which learned on the demo world, seed 0). The scene-graph
# GNN and the decision rule are fit on the calibration map only (runs/demo/scene_map8k); the
# test map answers 200 scenes per (tiles 2/4/8, heading 0 / +-15 deg), reported once.
# Real: UAVSAR test strip (experiments/uavsar.json, 2x2 / 3x3 tiles) and the sentinel-la test
# block (the shipped model weights/sentinel, 8x8 tiles), each calibrated on its training area.
# Needs the demo run (make demo), and ../shared/data/real for the real rows (skipped without; the
# UAVSAR models are trained here when missing (runs/uavsar, about 3 min), the sentinel-la rows need `make sentinel` and `make sentinel-registered`).
# Every step skips what is already there. Independent steps run JOBS [2] at a time, each at
# CMPC_THREADS [1] thread(s); the steps nothing runs beside (calibration, timing) at 2 threads.
# Smaller smoke runs: SCENES [200] test scenes per synthetic / real row, CAL_SCENES [30]
# calibration scenes per setting, GNN_SCENES [30] GNN training scenes per setting, DEMO_SCENES [50]
# per demo-strip row.
# The whole-map dense search (cmpc/localize/dense_search.py) is on by default: the decisions
# record it (`dense_search` in scene_decision.json).
# Overrides (defaults in brackets): MAP / CAL [demo-map8k / demo-map8k-cal] index names of the
# test / calibration maps, SCENE_MODEL [runs/demo/scene_map8k], METHODS [independent verify
# gnn+verify] of the synthetic rows, GNN [1] (0: calibrate verify only, `--no-gnn`), GNN_MODEL
# [none] a second scene model whose gnn+verify rows are added (reports/scenes_gnn).
# docs/scenes.json today: MAP=demo-map8k-fused SCENE_MODEL=runs/demo/scene_map8k_neg
# METHODS="independent verify" GNN=0 GNN_MODEL=runs/demo/scene_map8k_gnn (docs/RESULTS.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
CMPC=.venv/bin/cmpc
export CMPC_THREADS=${CMPC_THREADS:-1}
JOBS=${JOBS:-2}
N=${SCENES:-200}
NCAL=${CAL_SCENES:-30}
NDEMO=${DEMO_SCENES:-50}
MAP=${MAP:-demo-map8k}
CAL=${CAL:-demo-map8k-cal}
SCENE_MODEL=${SCENE_MODEL:-runs/demo/scene_map8k}
METHODS=${METHODS:-independent verify gnn+verify}
GNN_FLAGS=$([ "${GNN:-1}" = 0 ] && echo --no-gnn || echo --gnn-count ${GNN_SCENES:-30})
[ -f runs/demo/emb_best.pt ] || { echo "error: runs/demo/emb_best.pt is missing: run make demo first" >&2; exit 2; }

# A small job pool: `spawn CMD...` starts CMD in the background and waits while JOBS are running;
# `drain` waits for all. A failing job stops the script (set -e on wait -n) and the other jobs' shells
# (a cmpc command already running in one finishes its row first).
running=0
spawn() { "$@" & running=$((running + 1)); if [ $running -ge $JOBS ]; then wait -n; running=$((running - 1)); fi; }
drain() { while [ $running -gt 0 ]; do wait -n; running=$((running - 1)); done; }
trap 'kill $(jobs -p) 2> /dev/null || true' EXIT
alone() { CMPC_THREADS=2 "$@"; }  # a step nothing runs beside

# maps and their indexes (the auto factory)
mosaic() { $PY -m benchmarks.mosaic --tiles 4 --seed0 $1 --out $2 > /dev/null; }
spawn mosaic 7000 data/scenes/map8k
spawn mosaic 7100 data/scenes/map8k_cal
drain
index() { [ -f index/$1/manifest.json ] || $CMPC index build experiments/demo.json --raster $2 --name $1 > /dev/null; }
spawn index $MAP data/scenes/map8k/optical.tif
spawn index $CAL data/scenes/map8k_cal/optical.tif
drain

# Scenes under 64 tiles, or whose half-stride tiles over all headings fit 1,000, are tiled at half
# the reference stride (SceneSettings.min_scene_tiles / max_dense_tiles; half vs reference vs
# quarter stride measured on calibration-map scenes: experiments/scenes/select_tiling.py). The decision (thresholds
# or the logistic confidence model, by 5-fold cross-validation) is written with the calibration
# answers (scene_calibration.csv); `cmpc train scene ... --rechoose` re-chooses from them.
# scene GNN + decision rule on the calibration map. 100 candidates per tile were chosen there
# (60 8x8-tile calibration scenes, seed 4242: found within 5 m 0.82 / 0.92 / 0.95 with 20 / 50 / 100,
# docs/RESULTS.md); the test map never chose anything
[ -f $SCENE_MODEL/scene_decision.json ] || alone $CMPC train scene experiments/demo.json --sar data/scenes/map8k_cal/sar.tif \
  --areas data/scenes/map8k_cal/mosaic.json --index $CAL --out $SCENE_MODEL --tiles 2 4 8 --count $NCAL $GNN_FLAGS --top-k 100

# test scenes (no georeferencing; truth = where the content lies, the world's SAR misregistration removed),
# the costliest rows first so that the two lanes finish together
synthetic() {  # tiles per side, heading half-range (deg)
  local n=$1 h=$2 d=data/scenes/map8k_$1x$1_h$2 o=reports/scenes/synthetic_$1x$1_h$2
  [ -f $d/scenes.json ] || $CMPC data scenes experiments/demo.json --sar data/scenes/map8k/sar.tif --areas data/scenes/map8k/mosaic.json \
    --tiles $n --count $N --heading-range $h --seed $((9000 + 10 * n + h)) --out $d > /dev/null
  [ -f $o/rows.json ] || $CMPC eval scenes experiments/demo.json --scenes $d --index $MAP --scene-model $SCENE_MODEL \
    --methods $METHODS --rotation-range $h --out $o > /dev/null
}
for nh in "8 15" "4 15" "8 0" "2 15" "4 0" "2 0"; do spawn synthetic $nh; done

# real scenes
uavsar() {  # its models trained when missing (about 3 min), its rule calibrated on the strip's training area, then the scenes
  [ -f data/uavsar/dataset/dataset.json ] || $CMPC data tile experiments/uavsar.json > /dev/null
  [ -f runs/uavsar/refiner.pt ] || $PY train.py experiments/uavsar.json > /dev/null
  [ -f index/uavsar/manifest.json ] || $CMPC index build experiments/uavsar.json > /dev/null
  [ -f runs/uavsar/scene_decision.json ] || $CMPC train scene experiments/uavsar.json --tiles 2 3 --count $NCAL
  for n in 2 3; do
    local d=data/scenes/uavsar_${n}x${n}_h0 o=reports/scenes/uavsar_${n}x${n}_h0
    [ -f $d/scenes.json ] || $CMPC data scenes experiments/uavsar.json --tiles $n --count $N --seed $((9100 + n)) --out $d > /dev/null
    [ -f $o/rows.json ] || $CMPC eval scenes experiments/uavsar.json --scenes $d --methods independent verify gnn+verify --out $o > /dev/null
  done
}
if [ -d ../shared/data/real/uavsar-nc ]; then spawn uavsar; else echo "skip the UAVSAR rows: ../shared/data/real/uavsar-nc is absent" >&2; fi
# sentinel-la: the shipped model (weights/sentinel: the fused embedder trained on registered pairs,
# its aligner and decision; make sentinel-registered) on the test block's index that make
# sentinel-registered builds with that embedder (index/sentinel_reg_fused: the optical references are
# the same in every tiling, only the SAR moves); gnn+verify with the card's scene-graph GNN. The test
# scenes are cut three ways with one seed: on the files' published grid (make sentinel's
# data/sentinel-la) and from the test blocks registered by CFOG and by MI (make sentinel's
# data/sentinel-la32reg{,_mi}: each SAR file moved by its measured offset) -> docs/sentinel_registered.json
sentinel() {
  local d=data/scenes/sentinel_8x8_h0_u8 o=reports/scenes/sentinel_8x8_h0
  NAME=sentinel_reg_fused SCENE_SET="--set data.root=data/sentinel-la-reg/dataset" bash experiments/sentinel/scene_model.sh  # skips what is done
  [ -f $d/scenes.json ] || $CMPC data scenes experiments/sentinel.json --tiles 8 --count $N --seed 9208 --out $d > /dev/null
  [ -f $o/rows.json ] || $CMPC eval scenes --model sentinel --index sentinel_reg_fused --scenes $d \
    --methods independent verify gnn+verify --out $o > /dev/null
  local reg R dr or
  for reg in reg reg_mi; do
    R=data/sentinel-la32$reg/dataset dr=data/scenes/sentinel_8x8_h0_u8_$reg or=reports/scenes/sentinel_8x8_h0_$reg
    [ -f $R/dataset.json ] || continue
    [ -f $dr/scenes.json ] || $CMPC data scenes experiments/sentinel.json --set data.root=$R --tiles 8 --count $N --seed 9208 --out $dr > /dev/null
    [ -f $or/rows.json ] || $CMPC eval scenes --model sentinel --index sentinel_reg_fused --scenes $dr \
      --methods independent verify gnn+verify --out $or > /dev/null
  done
  $PY experiments/sentinel/registered.py > /dev/null
}
if [ ! -d ../shared/data/real/sentinel-la ]; then echo "skip the sentinel-la rows: ../shared/data/real/sentinel-la is absent" >&2
elif [ ! -f index/sentinel_reg_fused/manifest.json ]; then echo "skip the sentinel-la rows: index/sentinel_reg_fused is missing (make sentinel-registered builds it)" >&2
else spawn sentinel; fi
# the demo's own test strip (217 references), its rule (and GNN) calibrated on the demo training area
demo_row() {
  local n=$1 h=$2 d=data/demo/scenes/test_$1x$1_h$2 o=reports/scenes/demo_$1x$1_h$2
  [ -f $d/scenes.json ] || $CMPC data scenes experiments/demo.json --split test --tiles $n --count $NDEMO --heading-range $h --seed $((100 * n + h)) --out $d > /dev/null
  [ -f $o/rows.json ] || $CMPC eval scenes experiments/demo.json --scenes $d --methods $METHODS --rotation-range $h --out $o > /dev/null
}
demo_rows() {
  [ -f runs/demo/scene_decision.json ] || $CMPC train scene experiments/demo.json --count $NCAL $GNN_FLAGS > /dev/null
  for n in 2 3 4; do for h in 0 15; do demo_row $n $h; done; done
}
spawn demo_rows
# GNN_MODEL (e.g. runs/demo/scene_map8k_gnn, trained with --gnn-count 30 as above): its
# gnn+verify rows on the same test scenes into reports/scenes_gnn, joined by collect.py --more
gnn_rows() {
  local n=$1 h=$2 o=reports/scenes_gnn/synthetic_$1x$1_h$2
  [ -f $o/rows.json ] || $CMPC eval scenes experiments/demo.json --scenes data/scenes/map8k_${n}x${n}_h$h --index $MAP \
    --scene-model $GNN_MODEL --methods gnn+verify --rotation-range $h --out $o > /dev/null
}
MORE=()
if [ -n "${GNN_MODEL:-}" ]; then
  drain  # the scenes are cut
  for nh in "8 15" "4 15" "8 0" "2 15" "4 0" "2 0"; do spawn gnn_rows $nh; done
  MORE=(--more reports/scenes_gnn)
fi
drain

# seconds per scene on the quiet machine (2 threads, nothing beside)
MAP=$MAP SCENE_MODEL=$SCENE_MODEL METHODS="$METHODS" SENTINEL=1 bash experiments/scenes/timing.sh
[ -z "${GNN_MODEL:-}" ] || MAP=$MAP SCENE_MODEL=$GNN_MODEL METHODS=gnn+verify TROOT=reports/scenes_timing_gnn bash experiments/scenes/timing.sh
$PY experiments/scenes/collect.py "${MORE[@]}" --results docs/RESULTS.md
