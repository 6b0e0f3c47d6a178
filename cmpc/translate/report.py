"""Markdown tables of translator metrics (from ``cmpc translate eval`` JSON files).

``python -m cmpc.translate.report reports/*/translate/*.json`` prints one row per
translator checkpoint and direction: PSNR, SSIM, mPA, mIoU, FwIoU, FID variants, plus the
segmentation network on real target patches (the ceiling) once per direction.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _f(v: Any, nd: int = 3) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def eval_table(paths: list[str | Path]) -> str:
    """One markdown table over the given evaluation JSON files."""
    rows = [
        "| translator | epoch | direction | pairs | PSNR (dB) | SSIM | mPA | mIoU | FwIoU | FID-seg (floor) | FID-emb (floor) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ceilings: dict[str, dict[str, Any]] = {}
    for p in paths:
        res = json.loads(Path(p).read_text(encoding="utf-8"))
        meta = res["meta"]
        for d in ("sar2opt", "opt2sar"):
            b = res.get(d)
            if not b:
                continue
            seg = b.get("seg", {})
            fid_seg = f"{_f(b.get('fid_seg'), 2)} ({_f(b.get('fid_seg_floor'), 2)})" if "fid_seg" in b else "-"
            fid_emb = f"{_f(b.get('fid_emb'), 1)} ({_f(b.get('fid_emb_floor'), 1)})" if "fid_emb" in b else "-"
            rows.append(
                f"| {meta['model']} | {meta['epoch']} | {d} | {b['n']} | {_f(b['psnr_db'], 2)} | {_f(b['ssim'])} | "
                f"{_f(seg.get('mPA'))} | {_f(seg.get('mIoU'))} | {_f(seg.get('FwIoU'))} | {fid_seg} | {fid_emb} |"
            )
            if "seg_real" in b:
                ceilings[d] = b["seg_real"]
    for d, s in ceilings.items():
        rows.append(f"| real target (ceiling) | - | {d} | - | - | - | {_f(s.get('mPA'))} | {_f(s.get('mIoU'))} | {_f(s.get('FwIoU'))} | - | - |")
    return "\n".join(rows) + "\n"


def compact_grid(src: str | Path, dst: str | Path, rows: int = 3, scale: float = 0.75, colours: int = 96) -> Path:
    """A small copy of an evaluation grid for the docs: title row + first ``rows`` rows,
    resized by ``scale`` and palette-quantised (tens of kB instead of hundreds)."""
    from PIL import Image

    from cmpc.utils.io import atomic_path

    with Image.open(src) as im:
        img = im.convert("RGB")
    head, gap = 14, 2
    tile = (img.height - head) // 6 - gap if img.height > head else img.height
    n = max(1, min(rows, (img.height - head) // (tile + gap)))
    img = img.crop((0, 0, img.width, head + n * (tile + gap) - gap))
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)
    dst = Path(dst)
    with atomic_path(dst) as tmp:
        img.quantize(colours, method=Image.Quantize.MEDIANCUT).save(tmp, format="PNG", optimize=True)
    return dst


def _grid_tiles(img: "Image.Image", head: int = 14, gap: int = 2, cols: int = 3) -> list[list["Image.Image"]]:
    """Cut an evaluation grid (``save_grid``: ``cols`` columns, title row) into its tiles [row][col]."""
    tile = (img.width + gap) // cols - gap
    n_rows = (img.height - head + gap) // (tile + gap)
    return [
        [img.crop((c * (tile + gap), head + r * (tile + gap), c * (tile + gap) + tile, head + r * (tile + gap) + tile)) for c in range(cols)]
        for r in range(n_rows)
    ]


def comparison_grid(
    grids: list[tuple[str, str | Path]],
    dst: str | Path,
    rows: int = 4,
    scale: float = 0.5,
    colours: int = 128,
    source: str = "input",
    truth: str = "truth",
) -> Path:
    """One figure comparing translators on the same patches: columns ``source | label_1 .. label_n | truth``.

    ``grids``: (column label, evaluation grid PNG) of one dataset and direction. ``cmpc translate
    eval`` draws its sample rows with the same seed and ``eval_max``, so the rows are the same
    patches; that is checked (the input tiles must be pixel-identical), else a ValueError.
    Tiles are resized by ``scale`` and the PNG palette-quantised to ``colours`` colours (docs).
    """
    from PIL import Image, ImageChops, ImageDraw

    from cmpc.utils.io import atomic_path

    tiles = []
    for label, path in grids:
        with Image.open(path) as im:
            tiles.append(_grid_tiles(im.convert("RGB")))
    n = min(rows, *(len(t) for t in tiles))
    for (label, path), t in zip(grids[1:], tiles[1:]):
        for r in range(n):
            if t[r][0].size != tiles[0][r][0].size or ImageChops.difference(t[r][0], tiles[0][r][0]).getbbox() is not None:
                raise ValueError(f"{path}: row {r} shows another input patch than {grids[0][1]}; evaluate with the same eval_max and seed")
    side = round(tiles[0][0][0].width * scale)
    gap, head = 2, 12
    labels = [source] + [label for label, _ in grids] + [truth]
    canvas = Image.new("RGB", (len(labels) * (side + gap) - gap, head + n * (side + gap) - gap), (255, 255, 255))
    for r in range(n):
        cells = [tiles[0][r][0]] + [t[r][1] for t in tiles] + [tiles[0][r][2]]
        for c, cell in enumerate(cells):
            canvas.paste(cell.resize((side, side), Image.Resampling.LANCZOS), (c * (side + gap), head + r * (side + gap)))
    draw = ImageDraw.Draw(canvas)
    for c, text in enumerate(labels):
        draw.text((c * (side + gap) + 2, 0), text, fill=(0, 0, 0))
    dst = Path(dst)
    with atomic_path(dst) as tmp:
        canvas.quantize(colours, method=Image.Quantize.MEDIANCUT).save(tmp, format="PNG", optimize=True)
    return dst


START, END = "<!-- translators:start -->", "<!-- translators:end -->"
DATASETS = {
    "demo": "the demo world (`experiments/demo.json` data: synthetic 2 km city, cross-area split, 128 px patches)",
    "uavsar": "the real UAVSAR split (`experiments/uavsar.json` data: L-band Pauli RGB vs orthophoto, west train / east test, 64 px patches)",
}


def training_table(runs: Path, ds: str) -> str:
    """Per translator run of ``ds``: model, direction, CPU size, steps, wall time, final losses."""
    rows = [
        "| run | model | direction | crop px | ngf/ndf | epochs x steps | batch | minutes | final losses |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for d in sorted(runs.glob(f"translate_{ds}_*/translator")):
        log, cfg = d / "log.jsonl", d / "config.json"
        if not (log.is_file() and cfg.is_file() and (d / "last.pt").is_file()):
            continue
        recs = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
        tc = json.loads(cfg.read_text(encoding="utf-8"))["translate"]
        last = recs[-1]
        losses = ", ".join(f"{k} {v:.2f}" for k, v in last.items() if k not in ("epoch", "step", "lr", "seconds", "identity_used"))
        direction = tc["direction"] if tc["model"] == "pix2pix" else "both"
        steps = last["step"] // max(1, last["epoch"])
        rows.append(
            f"| {d.parent.name} | {tc['model']} | {direction} | {tc['patch_px']} | {tc['ngf']}/{tc['ndf']} | "
            f"{last['epoch']} x {steps} | {tc['batch_size']} | {last['seconds'] / 60:.1f} | {losses} |"
        )
    return "\n".join(rows) + "\n"


def _system(name: str, ds: str) -> str:
    """'translate_demo_emb_pix2pix_s1' -> 'pix2pix' (ensemble member name -> translator)."""
    import re

    return re.sub(r"_s\d+$", "", name.removeprefix(f"translate_{ds}_emb_"))


def seed_table(reports: Path, ds: str) -> str:
    """Test metrics over the seed replicates (``translate_<ds>_ensemble_s<seed>``): mean and range per system."""
    import numpy as np

    runs = sorted(reports.glob(f"translate_{ds}_ensemble_s*/translate_ensemble.json"))
    if not runs:
        return ""
    vals: dict[tuple[str, str], dict[str, list[float]]] = {}
    seeds = [p.parent.name.rsplit("_s", 1)[-1] for p in runs]
    # The control: ensembles of no-translator embedders of different seeds (only their fused row),
    # i.e. what fusing the same number of models gives without any translator.
    controls = sorted(reports.glob(f"translate_{ds}_control_s*/translate_ensemble.json"))
    for p in runs + controls:
        res = json.loads(p.read_text(encoding="utf-8"))
        is_control = p in controls
        for name, block in res["test"].items():
            if is_control and name != "ensemble":
                continue
            system = f"control: {len(res['meta']['members'])} no-translator embedders fused" if is_control else _system(name, ds)
            for qset, b in block.items():
                c = b["coarse"]
                d = vals.setdefault((system, qset), {"R@1": [], "R@5": [], "mAP": [], "median err (m)": [], "within 25 m": []})
                d["R@1"].append(c["recall"]["1"])
                d["R@5"].append(c["recall"]["5"])
                d["mAP"].append(c["mAP"])
                d["median err (m)"].append(c["error_m"]["median"])
                d["within 25 m"].append(c["error_m"]["within"]["25"])
    cols = ["R@1", "R@5", "mAP", "median err (m)", "within 25 m"]
    rows = [
        f"Seeds {', '.join(seeds)} (embedder initialisation and sampling; same data, translators and validation hold-out); "
        "each cell: mean (min-max) over the seeds, test split.",
        "",
        "| system | query set | seeds | " + " | ".join(cols) + " |",
        "|---|---|---|" + "---|" * len(cols),
    ]
    def order(key: tuple[str, str]) -> tuple[str, bool, bool, str]:  # none, translators, control, ensemble
        return (key[1], key[0] != "none", key[0].startswith(("ensemble", "control")), key[0])

    for system, qset in sorted(vals, key=order):
        d = vals[(system, qset)]
        nd = {c: 1 if c == "median err (m)" else 3 for c in cols}
        cells = [f"{np.mean(d[c]):.{nd[c]}f} ({min(d[c]):.{nd[c]}f}-{max(d[c]):.{nd[c]}f})" for c in cols]
        rows.append(f"| {system} | {qset} | {len(d['R@1'])} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def _strip_title(md: str) -> str:
    return "\n".join(line for line in md.splitlines() if not line.startswith("# ")).strip() + "\n"


def study_section(reports: str | Path = "reports", runs: str | Path = "runs", img_dir: str | Path = "docs/img") -> str:
    """The "Translators" section of docs/RESULTS.md from the study's reports (experiments/translate/study.sh)."""
    reports, runs, img_dir = Path(reports), Path(runs), Path(img_dir)
    out = [
        "## Translators (`experiments/translate/study.sh`)",
        "",
        "Made by `experiments/translate/study.sh` (every number below is from that run; the tables are "
        "regenerated by `python -m cmpc.translate.report --write-results docs/RESULTS.md`). Translator metrics are on "
        "the test split (the first `eval_max` co-registered pairs drawn with seed 0), PSNR/SSIM on [0, 1] after the "
        "translator's percentile normaliser. mPA/mIoU/FwIoU: this project's segmentation network for the target "
        "modality (trained on `labels.tif`) applied to the translated patch, scored against the label raster; the "
        "'real target' row is the same network on the real target patches (the ceiling). FID-seg / FID-emb: the FID "
        "formula on the segmentation encoder's pooled features / on the no-translator embedder's pooled trunk "
        "features, at equal sample sizes on disjoint halves, with the floor (real vs real) in brackets. **Neither "
        "uses Inception: the values are not comparable to published FIDs**, only to each other.",
        "",
    ]
    for ds, desc in DATASETS.items():
        evals = sorted(reports.glob(f"translate_{ds}_*/translate/*.json"))
        if not evals:
            continue
        out += [f"### {ds}: {desc}", "", "**Training (CPU sizes, 2 cores)**", "", training_table(runs, ds), "**Translation quality**", "", eval_table(evals)]
        if not any("seg" in json.loads(e.read_text(encoding="utf-8")).get(d, {}) for e in evals for d in ("sar2opt", "opt2sar")):
            out += ["No label raster for this data: no segmentation scores and no FID-seg; FID-emb only.", ""]
        for direction in ("sar2opt", "opt2sar"):
            grids: list[tuple[str, str | Path]] = []
            for e in evals:
                res = json.loads(e.read_text(encoding="utf-8"))
                if direction in res and Path(res[direction].get("grid", "")).is_file():
                    grids.append((f"{res['meta']['model']} e{res['meta']['epoch']}", res[direction]["grid"]))
            if grids:
                dst = img_dir / f"translate_{ds}_{direction}.png"
                src, tgt = ("SAR", "optical") if direction == "sar2opt" else ("optical", "SAR")
                comparison_grid(grids, dst, scale=0.75, source=f"{src} in", truth=f"{tgt} truth")
                out += [f"![{ds} {direction}](img/{dst.name})", "", f"*{ds}, {src} -> {tgt}: input, each translator, truth (test patches).*", ""]
        sel = reports / f"translate_{ds}_select" / "translate_select.md"
        if sel.is_file():
            out += ["**Checkpoint choice by the downstream task** (`cmpc translate select`)", "", _strip_title(sel.read_text(encoding="utf-8"))]
        ens = reports / f"translate_{ds}_ensemble" / "translate_ensemble.md"
        if ens.is_file():
            out += [
                "**Embedders without / with translated views, and the score-fusion ensemble** (`cmpc translate ensemble`; "
                "coarse retrieval, no refiner: error = distance from the top-1 reference centre to the true position); seed 0:",
                "",
                ens.read_text(encoding="utf-8").strip() + "\n",
            ]
        seeds = seed_table(reports, ds)
        if seeds:
            first = sorted(reports.glob(f"translate_{ds}_ensemble_s*/translate_ensemble.json"))[0]
            fused = [_system(m["name"], ds) for m in json.loads(first.read_text(encoding="utf-8"))["meta"]["members"]]
            out += [f"**The same comparison over seeds** (per seed, the ensemble fuses the embedders trained with {' / '.join(fused)} views)", "", seeds]
    return "\n".join(out).rstrip() + "\n"


def write_results(path: str | Path, section: str) -> Path:
    """Replace the text between the translators markers of ``path`` (append the block if absent)."""
    from cmpc.utils.io import atomic_write_text

    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Results\n"
    block = f"{START}\n{section}{END}"
    if START in text and END in text:
        text = text[: text.index(START)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    atomic_write_text(path, text)
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m cmpc.translate.report", description="Translator tables for docs/RESULTS.md.")
    ap.add_argument("evals", nargs="*", help="translate eval JSON files: print one table")
    ap.add_argument("--write-results", metavar="MD", help="regenerate the Translators section of this markdown file")
    ap.add_argument("--reports", default="reports")
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--img-dir", default="docs/img")
    args = ap.parse_args(argv)
    if args.write_results:
        write_results(args.write_results, study_section(args.reports, args.runs, args.img_dir))
        print(f"wrote the Translators section of {args.write_results}")
    if args.evals:
        print(eval_table(args.evals))
    return 0


if __name__ == "__main__":  # pragma: no cover - thin script
    raise SystemExit(main())
