"""Write the shipped Sentinel card's ``metrics`` from the reports of its runs (weights/sentinel/card.json).

    .venv/bin/python experiments/sentinel/card_metrics.py [--partial]

The card's numbers are copied from the reports that measured them, never typed: the validation
screen (rule 2 of experiments/sentinel/run_registered.sh), the coarse test rows per seed on the
registered 64 px map, the 32 px test tilings against the three truths (the published grid, CFOG-
and MI-registered), BigEarthNet 60-way, the cross-sensor checks (experiments/sentinel/cross.sh) and
the 8x8-tile test scenes (make scenes). Every report must carry the card's embedder sha256 (a report
of another model is refused); a missing one is an error unless ``--partial`` (then its section is
left out and named on stderr). ``metrics.previous_card`` (the card this one replaced) is kept as it is.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from cmpc.utils.io import atomic_write_json  # noqa: E402

#: section -> report folder under reports/ (cmpc test / cmpc localize metrics.json)
STAGED = {
    "sentinel_la_test_card_grid": "sentinel_regfused32",
    "sentinel_la_test_card_grid_registered/cfog": "sentinel_regfused32reg",
    "sentinel_la_test_card_grid_registered/mi": "sentinel_regfused32reg_mi",
}
SEEDS = ("sentinel_reg", "sentinel_reg_s1", "sentinel_reg_s2")
FUSED = "sentinel_reg_fused"
CROSS = {"s1s2": "sentinel-s1s2", "uavsar": "sentinel-uavsar"}
#: truth -> the 8x8-tile test scenes' report (make scenes)
SCENES = {"grid": "scenes/sentinel_8x8_h0", "cfog": "scenes/sentinel_8x8_h0_reg", "mi": "scenes/sentinel_8x8_h0_reg_mi"}
SOURCES = {
    "validation_block": "runs/sentinel_reg_fused/validation_screen.json (experiments/sentinel/screen_fusion.py): the registered validation "
                        "block, 420 references; member 0 the previous card, 1-3 the registered seeds, 1+2+3 their fusion (this embedder)",
    "sentinel_la_test": "reports/sentinel_reg_fused (coarse, this embedder), reports/sentinel_reg_fused_cfog (refined: the card's CFOG "
                        "refinement and gate) and reports/sentinel_reg{,_s1,_s2}{,_cfog} (each seed alone, the same gate): cmpc test "
                        "on the test blocks' 64 px map with each SAR file moved by its CFOG co-registration (1,305 references)",
    "sentinel_la_test_card_grid": "reports/sentinel_regfused32: the test blocks tiled every 32 px on the files' published grid (the grid "
                                  "truth: 9-29 m from the content on the test files, docs/RESULTS.md), the card's refine settings and gate, run once",
    "sentinel_la_test_card_grid_registered": "reports/sentinel_regfused32reg (CFOG, the primary record) and reports/sentinel_regfused32reg_mi "
                                             "(MI, the independent check): the test blocks tiled every 32 px with each SAR file moved by its "
                                             "measured co-registration, the card's refine settings and gate, run once each",
    "bigearthnet_60way": "reports/sentinel_reg_fused/pairs_bigearthnet_{resize,native}_amplitude_vh.json (cmpc eval pairs): VH dB -> amplitude 10^(dB/20)",
    "cross_checks_card_as_shipped": "experiments/sentinel/cross.sh: the user commands with this card (references every 266 m, CFOG ZNCC), "
                                    "each tile scored against its own georeferenced centre",
    "sentinel_la_test_scenes_8x8": "reports/scenes/sentinel_8x8_h0{,_reg,_reg_mi} (make scenes): cmpc eval scenes --model sentinel --index "
                                   "sentinel_reg_fused on the 200 scenes of seed 9208 cut from the grid / CFOG-registered / MI-registered "
                                   "test blocks, each answered once; timing: reports/scenes_timing/sentinel_8x8_h0 (first 20 scenes, 2 threads)",
}


class Missing(Exception):
    """A report the card's metrics need is absent."""


def _load(path: Path, sha: str) -> dict[str, Any]:
    if not path.is_file():
        raise Missing(str(path))
    rec = json.loads(path.read_text())
    got = (rec.get("meta") or {}).get("checkpoint_hash") or (rec.get("meta") or {}).get("embedder_sha256")
    if got is not None and got != sha:
        raise SystemExit(f"error: {path} was measured with embedder {str(got)[:12]}, not the card's {sha[:12]}")
    return rec


def _r(v: Any, nd: int = 3) -> Any:
    return None if v is None else round(float(v), nd)


def _stage(s: dict[str, Any]) -> dict[str, Any]:
    rec, err = s["recall"], s["error_m"]
    w = {float(k): v for k, v in err["within"].items()}
    return {"r1": _r(rec["1"]), "r5": _r(rec.get("5")), "r10": _r(rec.get("10")), "r20": _r(rec.get("20")), "map": _r(s.get("mAP")),
            "median_m": _r(err["median"]), "within_25m": _r(w.get(25.0)), "within_100m": _r(w.get(100.0)), "within_640m": _r(w.get(640.0))}


def _staged(m: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"n_refs": m["meta"]["references"]}
    for q in ("aligned", "non_aligned"):
        b = m.get(q)
        if isinstance(b, dict) and b.get("n_queries"):
            out[q] = {"n_queries": b["n_queries"], **{st: _stage(b[st]) for st in ("coarse", "refined") if isinstance(b.get(st), dict)}}
    return out


def sections(reports: Path, screen: Path, sha: str) -> tuple[dict[str, Any], list[str]]:
    """The card's metric sections from the reports present, and the reports missing."""
    out: dict[str, Any] = {}
    missing: list[str] = []

    def section(name: str, make) -> None:  # noqa: ANN001 - a callable returning the section
        try:
            out[name] = {"source": SOURCES[name], **make()}
        except Missing as e:
            missing.append(f"{name}: {e}")

    def validation() -> dict[str, Any]:
        if not screen.is_file():
            raise Missing(str(screen))
        s = json.loads(screen.read_text())
        rec = s["recall"]
        return {"n_refs": s["n_refs"], "aligned_r1": rec["1+2+3"]["aligned"]["1"], "aligned_r5": rec["1+2+3"]["aligned"]["5"],
                "aligned_r10": rec["1+2+3"]["aligned"]["10"], "non_aligned_r1": rec["1+2+3"]["non_aligned"]["1"],
                "members_aligned_r1": [rec[k]["aligned"]["1"] for k in ("1", "2", "3")],
                "previous_card_aligned_r1": rec["0"]["aligned"]["1"], "previous_card_non_aligned_r1": rec["0"]["non_aligned"]["1"]}

    def test64() -> dict[str, Any]:
        out = _staged(_load(reports / FUSED / "metrics.json", sha))
        refined = _staged(_load(reports / f"{FUSED}_cfog" / "metrics.json", sha))  # the same map, the card's refinement
        for q in ("aligned", "non_aligned"):
            if q in out and "refined" in refined.get(q, {}):
                out[q]["refined"] = refined[q]["refined"]
        members: dict[str, list[Any]] = {"aligned_coarse_r1": [], "aligned_refined_within_25m": [], "non_aligned_refined_within_25m": []}
        for run in SEEDS:
            for rep in (run, f"{run}_cfog"):
                if not (reports / rep / "metrics.json").is_file():
                    raise Missing(str(reports / rep / "metrics.json"))
            coarse = json.loads((reports / run / "metrics.json").read_text())
            ref = _staged(json.loads((reports / f"{run}_cfog" / "metrics.json").read_text()))
            members["aligned_coarse_r1"].append(_r(coarse["aligned"]["coarse"]["recall"]["1"]))
            for q in ("aligned", "non_aligned"):
                members[f"{q}_refined_within_25m"].append(ref.get(q, {}).get("refined", {}).get("within_25m"))
        return {**out, "members_aligned_coarse_r1": members["aligned_coarse_r1"],
                "members_mean": _r(sum(members["aligned_coarse_r1"]) / len(SEEDS)),
                "members_refined_within_25m": {k: v for k, v in members.items() if k != "aligned_coarse_r1"}}

    def grid32() -> dict[str, Any]:
        return _staged(_load(reports / STAGED["sentinel_la_test_card_grid"] / "metrics.json", sha))

    def reg32() -> dict[str, Any]:
        return {truth: _staged(_load(reports / STAGED[f"sentinel_la_test_card_grid_registered/{truth}"] / "metrics.json", sha)) for truth in ("cfog", "mi")}

    def bigearthnet() -> dict[str, Any]:
        res = {}
        for fit in ("resize", "native"):
            r = _load(reports / FUSED / f"pairs_bigearthnet_{fit}_amplitude_vh.json", sha)
            res[fit] = {"n": r["n"], "r1": _r(r["recall"]["1"]), "r5": _r(r["recall"]["5"]), "r10": _r(r["recall"]["10"]), "map": _r(r["mAP"])}
        return res

    def cross() -> dict[str, Any]:
        return {name: _staged(_load(reports / run / "metrics.json", sha)) for name, run in CROSS.items()}

    def scenes() -> dict[str, Any]:
        res: dict[str, Any] = {}
        for truth, run in SCENES.items():
            r = _load(reports / run / "rows.json", sha)
            res[truth] = {"n_scenes": r["rows"][0]["n_scenes"], "n_refs": r["meta"]["n_refs"],
                          **{row["method"]: {k: row[k] for k in ("success_25m", "success_5m", "not_found", "false_claims", "median_m")} for row in r["rows"]}}
        t = reports / "scenes_timing" / "sentinel_8x8_h0" / "rows.json"
        if t.is_file():
            res["s_per_scene_2threads_quiet"] = {row["method"]: row["s_per_scene"] for row in _load(t, sha)["rows"]}
        return res

    for name, make in (("validation_block", validation), ("sentinel_la_test", test64), ("sentinel_la_test_card_grid", grid32),
                       ("sentinel_la_test_card_grid_registered", reg32), ("bigearthnet_60way", bigearthnet),
                       ("cross_checks_card_as_shipped", cross), ("sentinel_la_test_scenes_8x8", scenes)):
        section(name, make)
    return out, missing


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--card", default="weights/sentinel/card.json")
    ap.add_argument("--reports", default="reports")
    ap.add_argument("--screen", default="runs/sentinel_reg_fused/validation_screen.json")
    ap.add_argument("--partial", action="store_true", help="write the sections whose reports exist; name the others on stderr")
    a = ap.parse_args(argv)
    card_path = Path(a.card)
    card = json.loads(card_path.read_text())
    sha = card["files"]["embedder"]["sha256"]
    got, missing = sections(Path(a.reports), Path(a.screen), sha)
    for m in missing:
        print(f"missing {m}", file=sys.stderr)
    if missing and not a.partial:
        print(f"error: {len(missing)} section(s) of the card's metrics have no report (--partial writes the rest)", file=sys.stderr)
        return 1
    previous = (card.get("metrics") or {}).get("previous_card")
    card["metrics"] = {"source": "docs/real.json (rows with this embedder's checkpoint_sha256), docs/sentinel_registered.json and "
                                 "docs/RESULTS.md 'Sentinel-1 / Sentinel-2 over Los Angeles'; written by experiments/sentinel/card_metrics.py",
                       "embedder_sha256": sha, **got, **({"previous_card": previous} if previous else {})}
    atomic_write_json(card_path, card)
    print(f"{len(got)} sections -> {card_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
