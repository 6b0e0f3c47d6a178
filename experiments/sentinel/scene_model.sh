#!/usr/bin/env bash
# The shipped Sentinel model's scene step (called by experiments/sentinel/run.sh and
# experiments/scenes/run.sh): a scene-graph GNN for the fused embedder trained on the training
# blocks with the default tiling (5 calibration scenes per setting), then both decisions (verify,
# gnn+verify) calibrated again with it at the reference stride on 30 scenes per setting (+ off-map
# copies). Writes runs/sentinel_fused/scene_gnn/{scene_graph.pt,scene_decision.json}; each step
# skips when done. Needs runs/sentinel_fused (make sentinel). GNN_SCENES [30] / CAL_SCENES [30]:
# scenes per setting for the GNN / the decisions (smaller for a smoke run). NAME [sentinel_fused]
# and SCENE_SET (more --set overrides) serve another fused model, e.g. the registered one:
# NAME=sentinel_reg_fused SCENE_SET="--set data.root=data/sentinel-la-reg/dataset" (it needs
# runs/$NAME/refiner.pt: cp weights/sentinel/aligner.pt there).
set -euo pipefail
cd "$(dirname "$0")/../.."
CMPC=.venv/bin/cmpc
NAME=${NAME:-sentinel_fused}
S=${S:-runs/$NAME/scene_gnn}
read -r -a XSET <<< "${SCENE_SET:-}"
SFLAGS=(--set name=$NAME "${XSET[@]}" --set refine.rerank=false --set refine.gnn_position=false --set refine.fine_align=false
        --set refine.gate=config --tiles 4 8 --heading-ranges 0 15 --out $S)
[ -f $S/scene_graph.pt ] || $CMPC train scene experiments/sentinel.json "${SFLAGS[@]}" --count 5 --gnn-count ${GNN_SCENES:-30}
.venv/bin/python -c "import json, sys; sys.exit(json.load(open('$S/scene_decision.json')).get('min_scene_tiles') != 0)" || \
  $CMPC train scene experiments/sentinel.json "${SFLAGS[@]}" --count ${CAL_SCENES:-30} --keep-gnn --min-tiles 0 --max-dense-tiles 0
