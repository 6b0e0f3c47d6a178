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


if __name__ == "__main__":  # pragma: no cover - thin script
    print(eval_table(sys.argv[1:]))
