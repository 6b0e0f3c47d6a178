"""What the shipped Sentinel model costs through the two user commands, at its reference spacing.

A user who trains nothing runs ``cmpc index build --model sentinel --raster MAP.tif`` and
``cmpc localize --model sentinel --index NAME --queries S1.tif`` (or ``cmpc georef`` for a
whole scene). The card indexes maps every 32 px (``inputs.ref_stride_m`` 265.6 m: patches cut
anywhere are then within 16 px of a reference); the baseline, measured in the same run, is
the half-patch grid of 64 px it replaced (a quarter of the references). Map: one sentinel-la
optical file (1024 x 1024 px at 8.3 m, test block: file 175); queries: 384 px of its SAR
(25 tiles of 128 px), refined by the card's CFOG fine alignment; scene: the same 384 px placed
by ``cmpc georef`` (on the decision's 64 px lattice of either map). Whole commands in a fresh
process each (interpreter, imports, model load and sha256 check included: what a user waits
for), 2 threads, median of ``repeats`` runs. Skipped (no rows) when ../shared/data/real is absent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import table

BENCH = "card"
TITLE = "The shipped Sentinel model: index build, patch and scene localization (user commands)"
LA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real" / "sentinel-la"


def _cmd(work: Path, *args: str) -> tuple[float, dict[str, Any]]:
    """Seconds of one ``cmpc`` command in a fresh process (2 threads) and its JSON answer."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "cmpc", *args], cwd=work, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"cmpc {' '.join(args)} failed: {p.stderr.strip()[-300:]}")
    return dt, json.loads(p.stdout)


def _median(xs: list[float]) -> float:
    return float(sorted(xs)[len(xs) // 2])


def _queries(work: Path) -> Path:
    import rasterio
    from rasterio.windows import Window

    out = work / "s1.tif"
    with rasterio.open(LA / "175_sar.tif") as src:
        win = Window(336, 336, 384, 384)  # 16 px off the 32 px grid: CFOG does real work
        prof = {**src.profile, "width": 384, "height": 384, "transform": src.window_transform(win)}
        for k in ("blockxsize", "blockysize", "tiled"):
            prof.pop(k, None)
        with rasterio.open(out, "w", **prof) as dst:
            dst.write(src.read(window=win))
    return out


def run(quick: bool) -> list[dict[str, Any]]:
    if not (LA / "175_optical.tif").is_file():
        print(f"bench card: {LA} is absent; skipped", file=sys.stderr)
        return []
    repeats = 1 if quick else 3
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_card_") as tmp:
        work = Path(tmp)
        q = _queries(work)
        base: dict[str, float] = {}
        for stride in (64, 32):  # 64: the baseline (the half-patch grid); 32: the card's
            build, loc, geo = [], [], []
            n_refs, n_q = 0, 0
            for r in range(repeats):
                name = f"s{stride}_{r}"
                dt, man = _cmd(work, "index", "build", "--model", "sentinel", "--raster", str(LA / "175_optical.tif"), "--name", name,
                               *(["--stride-px", "64"] if stride == 64 else []))
                build.append(dt)
                n_refs = int(man["sources"][0]["count"])
                assert int(man["sources"][0]["stride_px"]) == stride
                dt, res = _cmd(work, "localize", "--model", "sentinel", "--index", name, "--queries", str(q), "--out", f"loc_{name}")
                loc.append(dt)
                n_q = int(res["queries"])
                dt, _ = _cmd(work, "georef", "--model", "sentinel", "--index", name, "--scene", str(q), "--out", f"geo_{name}")
                geo.append(dt)
            row = {"bench": BENCH, "name": f"stride {stride} px", "stride_px": stride, "n_refs": n_refs, "n_queries": n_q,
                   "build_s": round(_median(build), 2), "localize_s": round(_median(loc), 2), "georef_s": round(_median(geo), 2),
                   "runs": repeats, "threads": 2}
            base = base or row
            row["build_vs_64"] = round(row["build_s"] / base["build_s"], 2)
            row["localize_vs_64"] = round(row["localize_s"] / base["localize_s"], 2)
            rows.append(row)
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    return "\n".join([
        "Seconds per whole command (fresh process: imports, model load and sha256 check included), 2 threads, median of "
        "`runs`; map: sentinel-la file 175's optical (1024 x 1024 px, 8.3 m); queries: 384 px of its SAR, 16 px off the "
        "32 px grid (25 tiles, CFOG-refined); georef: the same 384 px as one scene; `vs 64` = time / the 64 px grid's in "
        "the same run (the card indexes at 32 px since 2026-12-01):",
        "",
        table(rows, [("stride_px", "stride px"), ("n_refs", "references"), ("build_s", "index build s"), ("build_vs_64", "vs 64"),
                     ("n_queries", "queries"), ("localize_s", "localize s"), ("localize_vs_64", "vs 64"), ("georef_s", "georef s")]),
    ])
