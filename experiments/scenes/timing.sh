#!/usr/bin/env bash
# Seconds per scene at 2 threads on a quiet machine (the 200-scene runs of run.sh go at 1 thread,
# two at a time, so their times are upper bounds): the first 20 scenes of each synthetic setting,
# all three methods (they share the tiling and search), after models, index and map descriptors
# are loaded. collect.py reports these medians as s_per_scene.
# MAP / SCENE_MODEL / METHODS as in run.sh; TROOT the output root (default reports/scenes_timing;
# collect.py also reads reports/scenes_timing_*, e.g. TROOT=reports/scenes_timing_gnn for the
# GNN's rows). With SENTINEL=1 (needs make sentinel) also the first 20 sentinel-la test scenes
# with the shipped model (its card's decision and GNN; needs make sentinel-registered's index).
set -euo pipefail
cd "$(dirname "$0")/../.."
export CMPC_THREADS=2
MAP=${MAP:-demo-map8k}
SCENE_MODEL=${SCENE_MODEL:-runs/demo/scene_map8k}
METHODS=${METHODS:-independent verify gnn+verify}
TROOT=${TROOT:-reports/scenes_timing}
for n in 2 4 8; do for h in 0 15; do
  src=data/scenes/map8k_${n}x${n}_h$h
  sub=data/scenes/timing_${n}x${n}_h$h
  o=$TROOT/synthetic_${n}x${n}_h$h
  [ -f $o/rows.json ] && [ -z "${RETIME:-}" ] && continue  # measured already (RETIME=1 measures again)
  rm -rf $sub && mkdir -p $sub
  for t in $(ls $src/*.truth.json | head -20); do s=${t%.truth.json}; ln -s "$PWD/$s.tif" $sub/; ln -s "$PWD/$t" $sub/; done
  rm -rf $o
  .venv/bin/cmpc eval scenes experiments/demo.json --scenes $sub --index $MAP --scene-model $SCENE_MODEL \
    --methods $METHODS --rotation-range $h --out $o > /dev/null
done; done
if [ -n "${SENTINEL:-}" ] && [ -f index/sentinel_reg_fused/manifest.json ]; then
  src=data/scenes/sentinel_8x8_h0_u8
  sub=data/scenes/timing_sentinel_8x8_h0
  o=$TROOT/sentinel_8x8_h0
  if [ ! -f $o/rows.json ] || [ -n "${RETIME:-}" ]; then
    rm -rf $sub && mkdir -p $sub
    for t in $(ls $src/*.truth.json | head -20); do s=${t%.truth.json}; ln -s "$PWD/$s.tif" $sub/; ln -s "$PWD/$t" $sub/; done
    rm -rf $o
    .venv/bin/cmpc eval scenes --model sentinel --index sentinel_reg_fused --scenes $sub --methods independent verify gnn+verify --out $o > /dev/null
  fi
fi
