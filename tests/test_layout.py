"""The CMPC layout (SN6-CMPC compatible) and the dataset summary (``cmpc data info``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_rasters import make_pair

from cmpc.cli import main
from cmpc.config import TileConfig
from cmpc.data.info import dataset_summary, format_summary
from cmpc.data.layout import Annotation, read_annotations, safe_image_path, write_annotation
from cmpc.data.tiler import tile
from cmpc.errors import DataError


def _sn6(root: Path) -> dict[tuple[str, str], list[dict]]:
    """A tiny SN6-CMPC-style dataset: 4 references on a 2x2 grid (64 px, 50 % overlap at
    0.5 m/px -> 32 m patches every 16 m), per split 4 aligned queries and 2 non-aligned;
    annotations carry only id, pos, file_path, near_id (+ one unknown key)."""
    written: dict[tuple[str, str], list[dict]] = {}
    for split, base in (("train", 0), ("test", 10)):
        refs = [(base + i, 100.0 + 16 * (i % 2), 200.0 - 16 * (i // 2)) for i in range(4)]
        opt, sar = [], []
        for n, (i, x, y) in enumerate(refs):
            opt.append({"id": i, "pos": {"x": x, "y": y}, "file_path": f"{n}.png", "near_id": [i] + [j for j, *_ in refs if j != i]})
            sar.append({"id": i, "pos": {"x": x, "y": y}, "file_path": f"{n}.png", "near_id": [i]})
        sar.append({"id": base + 0, "pos": {"x": 103.0, "y": 198.5}, "file_path": "4.png", "near_id": [base], "sensor": "SN6"})
        sar.append({"id": base + 3, "pos": {"x": 114.0, "y": 186.0}, "file_path": "5.png", "near_id": [base + 3]})
        for mode, lst in (("opt", opt), ("sar", sar)):
            (root / split / "annotations" / mode).mkdir(parents=True)
            (root / split / "imgs" / mode).mkdir(parents=True)
            for n, d in enumerate(lst):
                (root / split / "annotations" / mode / f"{n}.json").write_text(json.dumps(d))
                arr = np.full((64, 64, 3) if mode == "opt" else (64, 64), n * 10, dtype=np.uint8)
                Image.fromarray(arr).save(root / split / "imgs" / mode / d["file_path"])
            written[split, mode] = lst
    return written


# --------------------------------------------------------------------------- layout


def test_sn6_annotations_round_trip_unchanged(tmp_path):
    root = tmp_path / "sn6"
    written = _sn6(root)
    out = tmp_path / "copy"
    for (split, mode), lst in written.items():
        anns = read_annotations(root, split, mode)
        assert [a.to_json() for a in anns] == lst  # same keys, same order, nothing added
        assert anns[0].crs is None and anns[0].aligned is None and anns[0].bounds is None
        for a in anns:
            write_annotation(out, split, mode, a)
            src = (root / split / "annotations" / mode / f"{a.name}.json").read_text()
            dst = (out / split / "annotations" / mode / f"{a.name}.json").read_text()
            assert json.loads(dst) == json.loads(src) and list(json.loads(dst)) == list(json.loads(src))
    extra = read_annotations(root, "train", "sar")[4]
    assert extra.extra == {"sensor": "SN6"} and extra.position_m == (103.0, 198.5)


def test_project_extensions_round_trip(tmp_path):
    a = Annotation(id=7, x=1.5, y=-2.0, file_path="3.tif", near_id=[7, 8], crs="EPSG:32631",
                   bounds=(0.0, -4.0, 3.0, 0.0), gsd=0.5, aligned=False, name="3", extra={"note": [1, 2]})
    write_annotation(tmp_path, "test", "sar", a)
    (b,) = read_annotations(tmp_path, "test", "sar")
    assert b == a


def test_file_path_escaping_its_folder_is_rejected(tmp_path):
    root = tmp_path / "sn6"
    _sn6(root)
    f = root / "train" / "annotations" / "sar" / "2.json"
    for bad in ("../../../secret.png", "../opt/0.png", "/etc/passwd"):
        f.write_text(json.dumps({"id": 2, "pos": {"x": 0, "y": 0}, "file_path": bad, "near_id": []}))
        with pytest.raises(DataError, match="escapes train/imgs/sar|is absolute"):
            read_annotations(root, "train", "sar")
    with pytest.raises(DataError, match="escapes"):
        safe_image_path(root, "test", "opt", "sub/../../x.png")
    assert safe_image_path(root, "test", "opt", "sub/x.png") == (root / "test/imgs/opt/sub/x.png").resolve()


def test_malformed_annotations(tmp_path):
    root = tmp_path / "sn6"
    _sn6(root)
    f = root / "test" / "annotations" / "opt" / "1.json"
    f.write_text('{"id": 1, "pos": {"x": 1, ')
    with pytest.raises(DataError, match=r"malformed JSON in .*test/annotations/opt/1.json"):
        read_annotations(root, "test", "opt")
    f.write_text('{"id": 1, "file_path": "1.png"}')
    with pytest.raises(DataError, match=r"missing key\(s\) \['pos'\]"):
        read_annotations(root, "test", "opt")
    f.write_text('{"id": "one", "pos": {"x": 1, "y": 2}, "file_path": "1.png"}')
    with pytest.raises(DataError, match="'id' must be an integer"):
        read_annotations(root, "test", "opt")


# --------------------------------------------------------------------------- data info


def test_info_on_sn6_layout_infers_everything(tmp_path, capsys):
    root = tmp_path / "sn6"
    _sn6(root)
    s = dataset_summary(root)
    assert s["described_by"] == "annotations" and s["crs"] is None
    assert s["splits"]["train"]["opt"] == {"patches": 4, "locations": 4, "missing_images": 0, "near_k": 4}
    sar = s["splits"]["test"]["sar"]
    assert (sar["patches"], sar["locations"], sar["aligned"], sar["non_aligned"], sar["aligned_inferred"]) == (6, 4, 4, 2, True)
    assert s["modalities"]["opt"] == {"bands": 3, "dtype": "uint8", "format": "png", "patch_px": [64, 64]}
    assert s["modalities"]["sar"]["bands"] == 1
    assert s["patch_px"] == 64 and s["patch_m"] is None
    assert s["extent_m"] == [100.0, 184.0, 116.0, 200.0] and s["extent_of"] == "centres"
    assert main(["data", "info", str(root)]) == 0
    text = capsys.readouterr().out
    assert "test   sar          6          4       4*            2" in text and "inferred" in text


def test_info_on_tiled_dataset(tmp_path, capsys):
    sar, opt = make_pair(tmp_path)
    root = tmp_path / "ds"
    meta = tile(sar, opt, root, TileConfig(patch_px=16), progress=False)
    s = dataset_summary(root)
    assert s["described_by"] == "dataset.json" and s["crs"] == "EPSG:32631" and s["crs_all"] == ["EPSG:32631"]
    assert (s["patch_px"], s["patch_m"], s["gsd_m"], s["stride_px"]) == (16, 16.0, 1.0, 8)
    for split in ("train", "test"):
        c = meta["counts"][split]
        got = s["splits"][split]
        assert got["opt"]["patches"] == c["opt"] and got["sar"]["patches"] == c["sar"]
        assert got["sar"]["aligned"] == c["sar_aligned"] and got["sar"]["non_aligned"] == c["sar_non_aligned"]
        assert got["sar"]["aligned_inferred"] is False
    # footprints of the train area (x 0..56) and the test strip (x 72..96), 64 m tall
    assert s["extent_m"] == [500000.0, 4999936.0, 500096.0, 5000000.0]
    assert s["modalities"]["sar"] == {"bands": 2, "dtype": "float32", "format": "tif", "patch_px": [16, 16]}
    assert main(["data", "info", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["splits"]["train"]["opt"]["patches"] == 42
    assert "16 px = 16.0 m" in format_summary(s)


def _one_opt_annotation(root: Path) -> None:
    """train/annotations/opt with one valid file, and no annotations/sar at all."""
    (root / "train" / "annotations" / "opt").mkdir(parents=True)
    (root / "train" / "annotations" / "opt" / "0.json").write_text(json.dumps({"id": 0, "pos": {"x": 0, "y": 0}, "file_path": "0.png"}))


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda r: None, "dataset root not found"),
        (lambda r: r.mkdir(), "is not a CMPC dataset"),
        (lambda r: _one_opt_annotation(r), "missing annotation folder"),
        (lambda r: [(r / "train" / "annotations" / m).mkdir(parents=True) for m in ("opt", "sar")], "no annotation files in"),
    ],
)
def test_info_on_empty_or_missing_folders(tmp_path, capsys, breakage, message):
    root = tmp_path / "empty"
    breakage(root)
    assert main(["data", "info", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_info_on_malformed_json_and_escaping_path(tmp_path, capsys):
    root = tmp_path / "sn6"
    _sn6(root)
    (root / "train" / "annotations" / "sar" / "3.json").write_text("{not json")
    assert main(["data", "info", str(root)]) == 2
    assert "malformed JSON in" in capsys.readouterr().err
    (root / "train" / "annotations" / "sar" / "3.json").write_text(
        json.dumps({"id": 3, "pos": {"x": 0, "y": 0}, "file_path": "../../../../etc/passwd", "near_id": []})
    )
    assert main(["data", "info", str(root)]) == 2
    assert "escapes train/imgs/sar" in capsys.readouterr().err


def test_info_counts_missing_images(tmp_path):
    root = tmp_path / "sn6"
    _sn6(root)
    (root / "test" / "imgs" / "opt" / "2.png").unlink()
    s = dataset_summary(root)
    assert s["splits"]["test"]["opt"]["missing_images"] == 1 and s["splits"]["train"]["opt"]["missing_images"] == 0
