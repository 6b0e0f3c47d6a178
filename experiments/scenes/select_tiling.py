"""Choose the scene tile spacing on the CALIBRATION map (never the test map).

A scene at a random position has its tiles off the reference grid by up to half a stride per
axis, where a tile's coarse recall is lowest. Tiling the scene at half the reference stride
puts some tile within a quarter stride of a reference position, at 4x the tiles. This
measures, with the decision switched off, how often the best placement is right (centre
within 5 / 25 m) for tile spacing 1 and 0.5 of the reference stride, on scenes cut from the
calibration map (seeds 7100-7115) with a seed no other step uses, and the seconds per scene.

    CMPC_THREADS=1 .venv/bin/python experiments/scenes/select_tiling.py --tiles 2 4 --count 60

Writes reports/scenes_select/tiling.json. Numbers in docs/RESULTS.md (Scene localization).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    from cmpc.config import load_experiment
    from cmpc.data.scenes import SceneSource
    from cmpc.evaluate.scenes import evaluate_scenes
    from cmpc.localize.georef import Georeferencer
    from cmpc.localize.localizer import Localizer
    from cmpc.localize.scene import SceneSettings
    from cmpc.utils.runtime import set_torch_threads

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiles", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--headings", type=float, nargs="+", default=[0.0])
    ap.add_argument("--count", type=int, default=60)
    ap.add_argument("--fracs", type=float, nargs="+", default=[1.0, 0.5])
    ap.add_argument("--top-k", dest="top_k", type=int, default=100)
    ap.add_argument("--seed", type=int, default=4343)
    ap.add_argument("--out", default=str(ROOT / "reports/scenes_select/tiling.json"))
    a = ap.parse_args(argv)
    set_torch_threads(None)
    exp = load_experiment(ROOT / "experiments/demo.json")
    cal = ROOT / "data/scenes/map8k_cal"
    source = SceneSource.of_files(str(cal / "sar.tif"), str(cal / "mosaic.json"), "train")
    loc = Localizer.from_experiment(exp, index_dir=ROOT / "index/demo-map8k-cal")
    work = ROOT / "data/scenes/select_tiling"
    rows = []
    for h in a.headings:
        for n in a.tiles:
            folder = work / f"cal_{n}x{n}_h{h:g}"
            if not (folder / "scenes.json").is_file():
                shutil.rmtree(folder, ignore_errors=True)
                source.cut(exp.data.root, folder, "train", n, a.count, h, a.seed + 10 * n + int(h))
            for frac in a.fracs:
                s = SceneSettings(rotation_range_deg=h, top_k=a.top_k, tile_stride_frac=frac, min_scene_tiles=0, min_inliers=0, min_inlier_frac=0.0, min_fine_peak=-1.0)
                geo = Georeferencer(loc, s, {"source": "selection (decision off)"})
                per = [r for r in evaluate_scenes(geo, folder, None, methods=("verify",), progress=False)["per_scene"]]
                err = np.array([r["centre_m"] if np.isfinite(r["centre_m"]) else 1e9 for r in per])
                row = {"tiles": n, "heading_deg": h, "tile_stride_frac": frac, "n_scenes": len(per),
                       "best_within_5m": round(float((err <= 5).mean()), 3), "best_within_25m": round(float((err <= 25).mean()), 3),
                       "tiles_searched": float(np.median([r["tiles"] for r in per])),
                       "s_per_scene": round(float(np.median([r["seconds"] for r in per])), 3)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"map": "calibration map (seeds 7100-7115), index demo-map8k-cal", "decision": "off (best placement)",
                               "top_k": a.top_k, "seed": a.seed, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
