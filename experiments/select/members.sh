#!/usr/bin/env bash
# How many embedders the demo fuses (train.members), chosen on the selection world (synthetic
# seed 7; the demo's test split chooses nothing). Trains three members of the demo recipe
# (seeds 0, 1, 2; runs/select_fused/members/seed<N>/, one `cmpc train emb` with
# train.members=3, resumable), then scores K = 1 (each seed alone), 2 (seeds 0+1) and 3 (all)
# on the selection world's test split, coarse only (217 aligned + 217 non-aligned queries).
# Rule (as in select.sh): the best aligned R@1; a larger K is taken only beyond the 0.02
# noise of the smaller, and only if `make demo` on a new machine (venv included) stays under
# 10 minutes with it (K = 3: the embedders alone took 380 s of the pipeline, so no; K = 2).
# Outputs: runs/select_fused/, reports/select_fused/k*/ (git-ignored); a table on stdout.
set -euo pipefail
main() {
cd "$(dirname "$0")/../.."
CMPC=${CMPC:-.venv/bin/python -m cmpc}
EXP=experiments/select/select_world.json
export HF_HUB_OFFLINE=1
if [ ! -f data/select/dataset/dataset.json ]; then
  $CMPC data synth $EXP
  $CMPC data tile $EXP
fi
$CMPC train emb $EXP --set name=select_fused --set train.members=3 --set refine.enabled=false
M=runs/select_fused/members
[ -f runs/select_fused/k2.pt ] || $CMPC model fuse runs/select_fused/k2.pt $M/seed0/emb_best.pt $M/seed1/emb_best.pt > /dev/null
for c in k1_seed0:$M/seed0/emb_best.pt k1_seed1:$M/seed1/emb_best.pt k1_seed2:$M/seed2/emb_best.pt \
         k2:runs/select_fused/k2.pt k3:runs/select_fused/emb_best.pt; do
  n=${c%%:*}; ck=${c#*:}
  [ -f reports/select_fused/$n/metrics.json ] || $CMPC test $EXP --set name=select_fused --set refine.enabled=false \
    --checkpoint $ck --set eval.out=reports/select_fused/$n --set eval.plots=false > /dev/null
done
${PYTHON:-.venv/bin/python} - <<'PY'
import json
print("| members | aligned R@1 / R@10 | non-aligned R@1 / R@10 |")
print("|---|---|---|")
for n in ("k1_seed0", "k1_seed1", "k1_seed2", "k2", "k3"):
    m = json.load(open(f"reports/select_fused/{n}/metrics.json"))
    a, na = m["aligned"]["coarse"]["recall"], m["non_aligned"]["coarse"]["recall"]
    print(f"| {n} | {a['1']:.3f} / {a['10']:.3f} | {na['1']:.3f} / {na['10']:.3f} |")
PY
}
main "$@"
exit
