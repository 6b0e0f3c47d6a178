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


if __name__ == "__main__":  # pragma: no cover - thin script
    print(eval_table(sys.argv[1:]))
