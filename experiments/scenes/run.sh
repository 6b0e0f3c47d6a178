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
# UAVSAR rows need runs/uavsar (experiments/uavsar.json), the sentinel-la rows `make sentinel`).
# Every step skips what is already there; about 1.5 h on the 2-core machine.
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
N=${SCENES:-200}
MAP=${MAP:-demo-map8k}
CAL=${CAL:-demo-map8k-cal}
SCENE_MODEL=${SCENE_MODEL:-runs/demo/scene_map8k}
METHODS=${METHODS:-independent verify gnn+verify}
GNN_FLAGS=$([ "${GNN:-1}" = 0 ] && echo --no-gnn || echo --gnn-count 30)
[ -f runs/demo/emb_best.pt ] || { echo "error: runs/demo/emb_best.pt is missing: run make demo first" >&2; exit 2; }

# maps and their indexes (the auto factory)
$PY -m benchmarks.mosaic --tiles 4 --seed0 7000 --out data/scenes/map8k > /dev/null
$PY -m benchmarks.mosaic --tiles 4 --seed0 7100 --out data/scenes/map8k_cal > /dev/null
[ -f index/$MAP/manifest.json ] || $CMPC index build experiments/demo.json --raster data/scenes/map8k/optical.tif --name $MAP > /dev/null
[ -f index/$CAL/manifest.json ] || $CMPC index build experiments/demo.json --raster data/scenes/map8k_cal/optical.tif --name $CAL > /dev/null

# Scenes under 64 tiles, or whose half-stride tiles over all headings fit 1,000, are tiled at half
# the reference stride (SceneSettings.min_scene_tiles / max_dense_tiles; half vs reference vs
# quarter stride measured on calibration-map scenes: experiments/scenes/select_tiling.py). The decision (thresholds
# or the logistic confidence model, by 5-fold cross-validation) is written with the calibration
# answers (scene_calibration.csv); `cmpc train scene ... --rechoose` re-chooses from them.
# scene GNN + decision rule on the calibration map. 100 candidates per tile were chosen there
# (60 8x8-tile calibration scenes, seed 4242: found within 5 m 0.82 / 0.92 / 0.95 with 20 / 50 / 100,
# docs/RESULTS.md); the test map never chose anything
[ -f $SCENE_MODEL/scene_decision.json ] || $CMPC train scene experiments/demo.json --sar data/scenes/map8k_cal/sar.tif \
  --areas data/scenes/map8k_cal/mosaic.json --index $CAL --out $SCENE_MODEL --tiles 2 4 8 --count 30 $GNN_FLAGS --top-k 100

# test scenes (no georeferencing; truth = where the content lies, the world's SAR misregistration removed)
for n in 2 4 8; do for h in 0 15; do
  d=data/scenes/map8k_${n}x${n}_h$h
  [ -f $d/scenes.json ] || $CMPC data scenes experiments/demo.json --sar data/scenes/map8k/sar.tif --areas data/scenes/map8k/mosaic.json \
    --tiles $n --count $N --heading-range $h --seed $((9000 + 10 * n + h)) --out $d > /dev/null
  o=reports/scenes/synthetic_${n}x${n}_h$h
  [ -f $o/rows.json ] || $CMPC eval scenes experiments/demo.json --scenes $d --index $MAP --scene-model $SCENE_MODEL \
    --methods $METHODS --rotation-range $h --out $o > /dev/null
done; done

# real scenes
if [ -d ../shared/data/real/uavsar-nc ] && [ -f runs/uavsar/emb_best.pt ]; then
  [ -f runs/uavsar/scene_decision.json ] || $CMPC train scene experiments/uavsar.json --tiles 2 3 --count 30
  for n in 2 3; do
    d=data/scenes/uavsar_${n}x${n}_h0
    [ -f $d/scenes.json ] || $CMPC data scenes experiments/uavsar.json --tiles $n --count $N --seed $((9100 + n)) --out $d > /dev/null
    o=reports/scenes/uavsar_${n}x${n}_h0
    [ -f $o/rows.json ] || $CMPC eval scenes experiments/uavsar.json --scenes $d --methods independent verify gnn+verify --out $o > /dev/null
  done
fi
# sentinel-la: the shipped model (weights/sentinel: the fused embedder, its aligner and decision) on
# the test block's index that `make sentinel` builds with that embedder (index/sentinel_fused);
# gnn+verify with a scene-graph GNN trained for it on the training area (trained with the default
# tiling, then the decisions calibrated again at the shipped model's reference-stride tiling)
if [ -d ../shared/data/real/sentinel-la ] && [ -f index/sentinel_fused/manifest.json ]; then
  S=runs/sentinel_fused/scene_gnn
  bash experiments/sentinel/scene_model.sh  # skips what make sentinel already did
  d=data/scenes/sentinel_8x8_h0_u8
  [ -f $d/scenes.json ] || $CMPC data scenes experiments/sentinel.json --tiles 8 --count $N --seed 9208 --out $d > /dev/null
  o=reports/scenes/sentinel_8x8_h0
  [ -f $o/rows.json ] || $CMPC eval scenes --model sentinel --index sentinel_fused --scene-model $S --scenes $d \
    --methods independent verify gnn+verify --out $o > /dev/null
fi
# the demo's own test strip (217 references), its rule calibrated on the demo training area
for n in 2 3 4; do for h in 0 15; do
  d=data/demo/scenes/test_${n}x${n}_h$h
  [ -f $d/scenes.json ] || $CMPC data scenes experiments/demo.json --split test --tiles $n --count 50 --heading-range $h --seed $((100 * n + h)) --out $d > /dev/null
  o=reports/scenes/demo_${n}x${n}_h$h
  [ -f $o/rows.json ] || $CMPC eval scenes experiments/demo.json --scenes $d --methods independent verify gnn+verify --rotation-range $h --out $o > /dev/null
done; done
MAP=$MAP SCENE_MODEL=$SCENE_MODEL METHODS="$METHODS" SENTINEL=1 bash experiments/scenes/timing.sh
# GNN_MODEL (e.g. runs/demo/scene_map8k_gnn, trained with --gnn-count 30 as above): its
# gnn+verify rows on the same test scenes into reports/scenes_gnn, joined by collect.py --more
MORE=()
if [ -n "${GNN_MODEL:-}" ]; then
  for n in 2 4 8; do for h in 0 15; do
    o=reports/scenes_gnn/synthetic_${n}x${n}_h$h
    [ -f $o/rows.json ] || $CMPC eval scenes experiments/demo.json --scenes data/scenes/map8k_${n}x${n}_h$h --index $MAP \
      --scene-model $GNN_MODEL --methods gnn+verify --rotation-range $h --out $o > /dev/null
  done; done
  MAP=$MAP SCENE_MODEL=$GNN_MODEL METHODS=gnn+verify TROOT=reports/scenes_timing_gnn bash experiments/scenes/timing.sh
  MORE=(--more reports/scenes_gnn)
fi
$PY experiments/scenes/collect.py "${MORE[@]}" --results docs/RESULTS.md
