#!/usr/bin/env bash
# Re-makes the demo's defaults on a selection world (experiments/select/select_world.json:
# the demo configuration on synthetic world seed 7) so that the demo's test split chooses
# nothing. Resumable: every finished step is skipped (a training resumes from emb_last.pt).
#
#   experiments/select/select.sh            # world, screen, fine_top sweep, tables
#   CMPC="python -m cmpc" experiments/select/select.sh
#   SCREEN_ONLY=1 ...: stop after the screen; CHOSEN=<row>: the recipe the fine_top sweep uses
#
# 1. screen: one change at a time from the base recipe (cmpc_cnn_s trunk, grid pooling,
#    128 px input, non-aligned positives on, 20 epochs), embedder only (refine off), coarse
#    R@k on the selection world's test split (217 aligned + 217 non-aligned queries).
#    Rule: best aligned R@1 (tie-break non-aligned R@10); a change within noise (0.02) of
#    the base is not taken (keep the simpler / cheaper option).
# 1b. (information) the same runs with their last-epoch checkpoint.
# 2. fine_top: the refiner of the chosen recipe, evaluated with refine.fine_top in
#    3 10 20 40 (80 added after 40 came out best at the grid's edge), localize.top_k =
#    max(20, fine_top); rule: the smallest value within 0.01 of the best non-aligned
#    refined within-25 m.
# Outputs: runs/select_*/, reports/select_*/ (git-ignored); the tables on stdout.
set -euo pipefail

# The body is one function, parsed whole before it runs: editing this file while it runs is safe.
main() {
cd "$(dirname "$0")/../.."
CMPC=${CMPC:-.venv/bin/python -m cmpc}
EXP=experiments/select/select_world.json
export HF_HUB_OFFLINE=1

# the recipe chosen by the screen (see docs/EMBEDDING.md, "Choices, measured")
CHOSEN=${CHOSEN:-base}

declare -A CAND=(
  [base]=""
  [cnn_m]="--set model.backbone=cmpc_cnn_m"
  [mnv3]="--set model.backbone=mobilenetv3_small_100"
  [img96]="--set data.img_size=96"
  [gem]="--set model.pool=gem"
  [no_na]="--set train.non_aligned=false"
)
ORDER=(base cnn_m img96 gem no_na mnv3)

# 0. the selection world and its dataset
if [ ! -f data/select/dataset/dataset.json ]; then
  $CMPC data synth $EXP
  $CMPC data tile $EXP
fi

# 1. the screen
for c in "${ORDER[@]}"; do
  name=select_$c
  if [ ! -f "reports/$name/metrics.json" ]; then
    # shellcheck disable=SC2086
    $CMPC train emb $EXP --set name=$name --set refine.enabled=false ${CAND[$c]}
    # shellcheck disable=SC2086
    $CMPC test $EXP --set name=$name --set refine.enabled=false ${CAND[$c]}
  fi
done

# 1b. the same candidates with their last-epoch checkpoint (emb_last.pt) instead of the
#     best-validation one the product uses: how much the checkpoint choice moves the screen
for c in "${ORDER[@]}"; do
  name=select_$c
  if [ ! -f "reports/$name/last/metrics.json" ]; then
    # shellcheck disable=SC2086
    $CMPC test $EXP --set name=$name --set refine.enabled=false ${CAND[$c]} \
      --checkpoint runs/$name/emb_last.pt --set eval.out=reports/$name/last
  fi
done

# 2. fine_top for the chosen recipe (SCREEN_ONLY=1: stop after the screen)
[ "${SCREEN_ONLY:-0}" = 1 ] && exit 0
name=select_$CHOSEN
if [ ! -f "runs/$name/refiner.pt" ]; then
  # shellcheck disable=SC2086
  $CMPC train refine $EXP --set name=$name ${CAND[$CHOSEN]}
fi
for t in 3 10 20 40 80; do
  out=reports/$name/fine_top$t
  if [ ! -f "$out/metrics.json" ]; then
    # fine alignment verifies min(fine_top, localize.top_k) candidates: 40 needs top_k 40
    topk=$(( t > 20 ? t : 20 ))
    # shellcheck disable=SC2086
    $CMPC test $EXP --set name=$name ${CAND[$CHOSEN]} --set refine.fine_top=$t --set localize.top_k=$topk --set eval.out=$out
  fi
done

# 3. the tables
${PYTHON:-${CMPC% -m cmpc}} - "$CHOSEN" "${ORDER[@]}" <<'EOF'
import json, sys
from pathlib import Path

chosen, order = sys.argv[1], sys.argv[2:]

def load(p):
    return json.loads(Path(p).read_text())

def f(v):
    return f"{v:.3f}"

print("| candidate | change from base | best epoch | aligned R@1 / R@5 / R@10 | non-aligned R@1 / R@5 / R@10 | last epoch: aligned R@1 / non-aligned R@10 | train CPU s |")
print("|---|---|---|---|---|---|---|")
rows = {}
for c in order:
    m = load(f"reports/select_{c}/metrics.json")
    log = [json.loads(l) for l in Path(f"runs/select_{c}/log.jsonl").read_text().splitlines() if l.strip()]
    vals = [r for r in log if r.get("kind") == "val"]
    best = max(vals, key=lambda r: (r["recall"]["1"], r["recall"]["5"])) if vals else {}
    secs = sum(r.get("cpu_seconds", 0.0) for r in log if r.get("kind") == "epoch")
    cfg = load(f"runs/select_{c}/config.json")
    change = {"base": "-", "cnn_m": "trunk cmpc_cnn_m", "mnv3": "trunk mobilenetv3_small_100",
              "img96": "input 96 px", "gem": "pool gem", "no_na": "non-aligned positives off"}.get(c, c)
    a, n = m["aligned"]["coarse"]["recall"], m["non_aligned"]["coarse"]["recall"]
    rows[c] = (a["1"], n["10"])
    ml = load(f"reports/select_{c}/last/metrics.json")
    la, ln = ml["aligned"]["coarse"]["recall"], ml["non_aligned"]["coarse"]["recall"]
    print(f"| {c} | {change} | {best.get('epoch', '?')} of {cfg['train']['epochs']} | "
          f"{f(a['1'])} / {f(a['5'])} / {f(a['10'])} | {f(n['1'])} / {f(n['5'])} / {f(n['10'])} | "
          f"{f(la['1'])} / {f(ln['10'])} | {secs:.0f} |")
top = max(rows, key=lambda c: rows[c])
better = [c for c in rows if rows[c][0] > rows["base"][0] + 0.02]  # beyond noise
rule = max(better, key=lambda c: rows[c]) if better else "base"
print(f"\nbest aligned R@1 (tie-break non-aligned R@10): {top} ({rows[top][0] - rows['base'][0]:+.3f} over base); "
      f"beyond the 0.02 noise: {better or 'none'}; rule: {rule}; fine_top sweep ran with: {chosen}")

print("\n| fine_top | non-aligned refined R@1 | median err (m) | within 5 m | within 25 m | aligned refined R@1 | aligned within 25 m | ms per query |")
print("|---|---|---|---|---|---|---|---|")
w = {}
for t in (3, 10, 20, 40, 80):
    m = load(f"reports/select_{chosen}/fine_top{t}/metrics.json")
    na, al = m["non_aligned"]["refined"], m["aligned"]["refined"]
    w[t] = na["error_m"]["within"]["25"]
    spq = m.get("meta", {}).get("timing", {}).get("ms_per_query")
    spq = f"{spq:.1f}" if isinstance(spq, (int, float)) else "?"
    print(f"| {t} | {f(na['recall']['1'])} | {na['error_m']['median']:.2f} | {f(na['error_m']['within']['5'])} | "
          f"{f(w[t])} | {f(al['recall']['1'])} | {f(al['error_m']['within']['25'])} | {spq} |")
best = max(w.values())
print(f"\nfine_top by the rule (smallest within 0.01 of the best non-aligned within 25 m = {best:.3f}): "
      f"{min(t for t in w if w[t] >= best - 0.01)}")
EOF
}

main "$@"
exit
