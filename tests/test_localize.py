"""cmpc localize: query kinds, streaming, priors, GeoTIFF queries, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cmpc.errors import ConfigError, DataError, IndexMismatchError
from index_fixtures import CRS, ORIGIN, evaluate_command, experiment, localize_command, write_checkpoint, write_dataset, write_experiment_json


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Dataset + checkpoint + index 'loc' (16 references, 4 non-aligned queries)."""
    import os

    from cmpc.index.build import build_index

    root = tmp_path_factory.mktemp("loc_world")
    info = write_dataset(root / "ds", grid=4, non_aligned=4)
    write_checkpoint(root / "runs" / "loc" / "emb_best.pt")
    cwd = Path.cwd()
    os.chdir(root)
    try:
        build_index(experiment("loc", "ds"))
    finally:
        os.chdir(cwd)
    return root, info


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_geotiff(path: Path, arr: np.ndarray, crs: str, west: float, north: float, res: float) -> Path:
    import rasterio
    from rasterio.transform import from_origin

    with rasterio.open(path, "w", driver="GTiff", width=arr.shape[2], height=arr.shape[1], count=arr.shape[0],
                       dtype="float32", crs=crs, transform=from_origin(west, north, res, res)) as dst:
        dst.write(arr.astype(np.float32))
    return path


# --------------------------------------------------------------------------- streaming


@pytest.mark.slow
def test_streaming_1000_queries_equals_one_batch(world, monkeypatch):
    root, info = world
    monkeypatch.chdir(root)
    folder = root / "many"
    folder.mkdir()
    rng = np.random.default_rng(0)
    sar = info["sar_world"][0]
    lo, hi = sar.min(), sar.max()
    for i in range(1000):
        r, c = rng.integers(0, sar.shape[0] - 16, size=2)
        patch = (255 * (sar[r : r + 16, c : c + 16] - lo) / (hi - lo)).astype(np.uint8)
        Image.fromarray(patch).save(folder / f"q{i:04d}.png")
    one = localize_command(experiment("loc", "ds", "localize.batch_size=1000"), str(folder), out="one")
    many = localize_command(experiment("loc", "ds", "localize.batch_size=37"), str(folder), out="many")
    assert one["queries"] == many["queries"] == 1000 and one["kind"] == "folder"
    a, b = _read_csv(root / "one" / "predictions.csv"), _read_csv(root / "many" / "predictions.csv")
    assert [r["query"] for r in a] == [f"q{i:04d}" for i in range(1000)] == [r["query"] for r in b]
    same_ids = np.mean([ra["topk_ids"] == rb["topk_ids"] for ra, rb in zip(a, b)])
    assert same_ids >= 0.995  # batch size may only flip float-level ties of an untrained model
    sa = np.array([[float(v) for v in r["topk_scores"].split()] for r in a])
    sb = np.array([[float(v) for v in r["topk_scores"].split()] for r in b])
    assert np.allclose(sa, sb, atol=1e-5)
    assert "true_id" not in a[0]  # a patch folder has no ground truth: no metrics either
    assert not (root / "one" / "metrics.json").exists()


# --------------------------------------------------------------------------- query kinds


@pytest.mark.parametrize("where,n,truth", [("ds", 20, True), ("ds/test", 20, True), ("ds/test/annotations/sar", 20, True), ("ds/test/imgs/sar", 20, False)])
def test_query_kinds(world, monkeypatch, where, n, truth):
    root, info = world
    monkeypatch.chdir(root)
    out = f"out_{where.replace('/', '_')}"
    s = localize_command(experiment("loc", "ds", "eval.plots=false"), where, out=out)
    assert s["queries"] == n
    rows = _read_csv(root / out / "predictions.csv")
    assert len(rows) == n and ("true_id" in rows[0]) == truth
    assert (root / out / "metrics.json").exists() == truth
    geo = json.loads((root / out / "predictions.geojson").read_text())
    assert geo["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32631" and len(geo["features"]) == n
    f0 = geo["features"][0]
    assert len(f0["properties"]["topk_ids"]) == 5 and len(f0["properties"]["topk_scores"]) == 5
    assert f0["geometry"]["coordinates"] == [f0["properties"]["coarse_x"], f0["properties"]["coarse_y"]]
    if truth:
        m = json.loads((root / out / "metrics.json").read_text())
        assert m["aligned"]["n_queries"] == 16 and m["non_aligned"]["n_queries"] == 4
        # the coarse position is the centre of the top-1 reference
        by_id = {a.id: (a.x, a.y) for a in info["refs"]}
        for r in rows:
            assert (float(r["coarse_x"]), float(r["coarse_y"])) == by_id[int(r["top1_id"])]


def test_geojson_reads_back_in_gis(world, monkeypatch):
    import geopandas as gpd


    root, _ = world
    monkeypatch.chdir(root)
    localize_command(experiment("loc", "ds", "eval.plots=false"), "ds", out="gis")
    gdf = gpd.read_file(root / "gis" / "predictions.geojson")
    assert len(gdf) == 20 and gdf.crs.to_epsg() == 32631
    assert gdf.geometry.x.between(ORIGIN[0], ORIGIN[0] + 40).all()


# --------------------------------------------------------------------------- priors


def test_prior_disc_and_polygon_restrict_candidates(world, monkeypatch):
    root, info = world
    monkeypatch.chdir(root)
    refs = {a.id: np.array([a.x, a.y]) for a in info["refs"]}
    centre = [ORIGIN[0] + 16.0, ORIGIN[1] - 16.0]  # the centre of reference 5
    s = localize_command(experiment("loc", "ds", f"localize.prior_center={json.dumps(centre)}", "localize.prior_radius_m=9", "eval.plots=false"), "ds", out="disc")
    inside = {i for i, p in refs.items() if np.hypot(*(p - centre)) <= 9}
    assert s["prior_candidates"] == len(inside) == 5  # the centre reference and its 4 grid neighbours
    for r in _read_csv(root / "disc" / "predictions.csv"):
        ids = [int(v) for v in r["topk_ids"].split()]
        assert len(ids) == 5 and set(ids) == inside

    # the same area as a polygon in metres (hand-written GeoJSON: no crs member)
    x0, y0 = centre[0] - 8.5, centre[1] - 8.5
    ring = [[x0, y0], [x0 + 17, y0], [x0 + 17, y0 + 17], [x0, y0 + 17], [x0, y0]]
    (root / "prior.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [ring]}}]}))
    s = localize_command(experiment("loc", "ds", "localize.prior=prior.geojson", "eval.plots=false"), "ds", out="poly")
    box = {i for i, p in refs.items() if x0 < p[0] < x0 + 17 and y0 < p[1] < y0 + 17}
    assert s["prior_candidates"] == len(box) == 9
    for r in _read_csv(root / "poly" / "predictions.csv"):
        assert set(int(v) for v in r["topk_ids"].split()) <= box
        # ranks under a prior count only allowed references: never above the candidate count
        if r["coarse_rank"]:
            assert int(r["coarse_rank"]) <= 9

    with pytest.raises(ConfigError, match="go together"):
        localize_command(experiment("loc", "ds", f"localize.prior_center={json.dumps(centre)}"), "ds", out="x")
    with pytest.raises(DataError, match="contains no reference"):
        localize_command(experiment("loc", "ds", "localize.prior_center=[0, 0]", "localize.prior_radius_m=5"), "ds", out="x")


# --------------------------------------------------------------------------- GeoTIFF queries


def test_geotiff_queries_tiled_on_the_fly(world, monkeypatch):
    root, info = world
    monkeypatch.chdir(root)
    sar = info["sar_world"]  # (1, 40, 40), 1 m/px, upper-left at ORIGIN
    tif = _write_geotiff(root / "sar.tif", sar, CRS, ORIGIN[0], ORIGIN[1], 1.0)
    s = localize_command(experiment("loc", "ds"), str(tif), out="tif")
    # patches of the references' footprint (16 m = 16 px), stride 8 px over 40 px: 4 x 4
    assert s["kind"] == "raster" and s["queries"] == 16
    rows = _read_csv(root / "tif" / "predictions.csv")
    assert rows[0]["query"] == "sar_r0_c0" and "true_id" not in rows[0]
    # co-registered with the map: each tile is scored against its own footprint centre
    s = localize_command(experiment("loc", "ds", "localize.raster_truth=true"), str(tif), out="tif_truth")
    rows = _read_csv(root / "tif_truth" / "predictions.csv")
    assert len(rows) == 16
    r0 = next(r for r in rows if r["query"] == "sar_r0_c0")
    assert (float(r0["true_x"]), float(r0["true_y"])) == (ORIGIN[0] + 8.0, ORIGIN[1] - 8.0)  # centre of the first 16 px tile
    refs = {int(r["top1_id"]): (float(r["coarse_x"]), float(r["coarse_y"])) for r in rows}
    for r in rows:
        if r["coarse_rank"] == "1":  # found: the top-1 reference sits exactly on the tile
            assert refs[int(r["top1_id"])] == (float(r["true_x"]), float(r["true_y"])) and float(r["coarse_error_m"]) == 0.0
    assert sum(r["true_id"] != "-1" for r in rows) >= 9  # tiles on the reference grid have a correct reference

    # a strip in geographic coordinates over the map is warped to the map CRS and localized
    from pyproj import Transformer

    to_ll = Transformer.from_crs(CRS, "EPSG:4326", always_xy=True)
    lon0, lat0 = to_ll.transform(ORIGIN[0], ORIGIN[1])
    lon1, lat1 = to_ll.transform(ORIGIN[0] + 40, ORIGIN[1] - 40)
    res = (lon1 - lon0) / 40
    ll = _write_geotiff(root / "sar_ll.tif", sar, "EPSG:4326", lon0, lat0, res)
    s = localize_command(experiment("loc", "ds"), str(ll), out="tif_ll")
    assert s["queries"] >= 4

    far = _write_geotiff(root / "far.tif", sar, CRS, ORIGIN[0] + 10_000, ORIGIN[1], 1.0)
    with pytest.raises(DataError, match="does not overlap"):
        localize_command(experiment("loc", "ds"), str(far), out="x")
    other = _write_geotiff(root / "utm32.tif", sar, "EPSG:32632", ORIGIN[0], ORIGIN[1], 1.0)
    with pytest.raises(IndexMismatchError, match="EPSG:32632"):
        localize_command(experiment("loc", "ds"), str(other), out="x")
    three = _write_geotiff(root / "three.tif", np.concatenate([sar] * 3), CRS, ORIGIN[0], ORIGIN[1], 1.0)
    with pytest.raises(DataError, match="have 3 band"):
        localize_command(experiment("loc", "ds"), str(three), out="x")
    s = localize_command(experiment("loc", "ds", "localize.raster_bands=[2]"), str(three), out="tif_b2")  # pick one band
    assert s["queries"] == 16


# --------------------------------------------------------------------------- bad input through the CLI


class Payload:  # a class inside a checkpoint: code, refused by weights_only=True
    def __reduce__(self):
        return (print, ("this ran",))


def test_bad_input_is_one_clear_line(world, monkeypatch, capsys, tmp_path):
    from cmpc.cli import main

    root, info = world
    monkeypatch.chdir(root)
    exp = write_experiment_json(root / "loc.json", "loc", "ds")

    def err_of(*args: str) -> str:
        assert main(["localize", str(exp), *args]) == 2
        e = capsys.readouterr().err.strip()
        assert e.startswith("error: ") and "\n" not in e, e
        return e

    (root / "empty").mkdir(exist_ok=True)
    assert "no SAR patches" in err_of("--queries", "empty")
    assert "queries not found" in err_of("--queries", "nowhere")

    three = root / "three_band"
    three.mkdir(exist_ok=True)
    for i in range(3):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8) + i).save(three / f"{i}.png")
    e = err_of("--queries", "three_band")
    assert "have 3 band(s)" in e and "takes 1 SAR band(s)" in e

    write_checkpoint(root / "other.pt", seed=7)
    e = err_of("--queries", "ds", "--checkpoint", "other.pt")
    assert "was built with checkpoint" in e and "cmpc index build" in e

    (root / "corrupt.pt").write_bytes((root / "runs" / "loc" / "emb_best.pt").read_bytes()[:3000])
    assert "corrupt or truncated" in err_of("--queries", "ds", "--checkpoint", "corrupt.pt")
    torch.save({"kind": "embedder", "model": Payload()}, root / "code.pt")
    assert "holds code" in err_of("--queries", "ds", "--checkpoint", "code.pt")
    assert "this ran" not in capsys.readouterr().out

    # queries annotated in another CRS than the map
    write_dataset(tmp_path / "ds32", grid=2, non_aligned=0, crs="EPSG:32632")
    e = err_of("--queries", str(tmp_path / "ds32"))
    assert "EPSG:32632" in e and "EPSG:32631" in e

    # no index for this experiment
    exp2 = write_experiment_json(root / "noidx.json", "noidx", "ds")
    (root / "runs" / "noidx").mkdir(parents=True, exist_ok=True)
    (root / "runs" / "noidx" / "emb_best.pt").write_bytes((root / "runs" / "loc" / "emb_best.pt").read_bytes())
    assert main(["localize", str(exp2), "--queries", "ds"]) == 2
    assert "no index at index/noidx" in capsys.readouterr().err

    # a dataset root without the requested split
    e = err_of("--queries", "ds", "--split", "train")
    assert "--split" in e

    # CLI success path: --top-k and the default output folder
    assert main(["localize", str(exp), "--queries", "ds/test/imgs/sar", "--top-k", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["queries"] == 20 and out["out"] == "reports/loc/localize"
    assert len(_read_csv(root / "reports" / "loc" / "localize" / "predictions.csv")[0]["topk_ids"].split()) == 3


def test_failed_run_leaves_previous_outputs(world, monkeypatch):
    """A run that fails mid-stream must not leave half-written predictions."""
    import cmpc.localize.run as run

    root, _ = world
    monkeypatch.chdir(root)
    localize_command(experiment("loc", "ds", "eval.plots=false"), "ds/test/imgs/sar", out="keep")
    before = (root / "keep" / "predictions.csv").read_bytes()
    real = run.Localizer.localize_batch
    calls = {"n": 0}

    def fails_second_batch(self, x):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, x)

    monkeypatch.setattr(run.Localizer, "localize_batch", fails_second_batch)
    with pytest.raises(KeyboardInterrupt):
        localize_command(experiment("loc", "ds", "eval.plots=false", "localize.batch_size=4"), "ds/test/imgs/sar", out="keep")
    assert (root / "keep" / "predictions.csv").read_bytes() == before
    assert sorted(p.name for p in (root / "keep").iterdir()) == ["predictions.csv", "predictions.geojson"]


# --------------------------------------------------------------------------- real data


@pytest.mark.slow
@pytest.mark.real
def test_real_sentinel1_geotiff_against_sentinel2_map(real_data, tmp_path, monkeypatch):
    """Real 2-band float Sentinel-1 GeoTIFF localized on the fly against a Sentinel-2 map."""
    from cmpc.config import TileConfig
    from cmpc.data.tiler import tile

    s1 = real_data / "s1s2-gefolki" / "S1_patch11.tif"
    s2 = real_data / "s1s2-gefolki" / "S2_patch11.tif"
    tile(s1, s2, tmp_path / "ds", TileConfig(patch_px=128, split="same-area", test_fraction=0.5, non_aligned_per_ref=0.0), progress=False)
    write_checkpoint(tmp_path / "runs" / "s1s2" / "emb_best.pt", sar_channels=2, optical_channels=3, img_size=32)
    monkeypatch.chdir(tmp_path)
    exp = experiment("s1s2", "ds", "eval.plots=false")
    m = evaluate_command(exp)  # the index step builds index/s1s2 from the 6 x 6 S2 reference grid first
    assert m["meta"]["references"] == 36 and m["meta"]["split"] == "same-area"
    assert m["aligned"]["n_queries"] > 0 and 0.0 <= m["aligned"]["coarse"]["recall"]["20"] <= 1.0
    s = localize_command(exp, str(s1), out="tif")
    assert s["kind"] == "raster" and s["queries"] == 36  # 1280 m footprints = 128 px at 10 m, stride 64 px
    rows = _read_csv(tmp_path / "tif" / "predictions.csv")
    xy = np.array([[float(r["x"]), float(r["y"])] for r in rows])
    assert (xy[:, 0] >= 399_940).all() and (xy[:, 0] <= 404_420).all()  # S2 map extent, EPSG:32631
    assert (xy[:, 1] >= 5_095_540).all() and (xy[:, 1] <= 5_100_020).all()
