"""Translator experiment files (experiments/translate/) and the docs' comparison grids."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cmpc.config import load_experiment
from cmpc.translate.evaluate import save_grid
from cmpc.translate.report import comparison_grid

REPO = Path(__file__).resolve().parents[1]
TRANSLATE = REPO / "experiments" / "translate"
# What may differ between the embedders of one comparison: the translated views, nothing else.
ALLOWED = {"name", "description", "translate.views"}


@pytest.mark.parametrize("exp_file", sorted(TRANSLATE.glob("*.json")), ids=lambda p: p.name)
def test_translator_experiments_load(exp_file):
    exp = load_experiment(exp_file)
    assert exp.name == exp_file.stem  # run folders are named after the files
    for v in exp.translate.views:
        assert v.startswith("runs/translate_") and v.endswith(".pt")


def _flat(exp) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in exp.to_dict().items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


def _differences(a, b) -> set[str]:
    fa, fb = _flat(a), _flat(b)
    return {k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k)}


@pytest.mark.parametrize("world,translators", [("demo", ["pix2pix", "cyclegan", "segcyclegan"]), ("uavsar", ["pix2pix", "cyclegan"])])
def test_embedders_with_and_without_views_differ_only_in_views(world, translators):
    base = load_experiment(TRANSLATE / f"translate_{world}_emb_none.json")
    assert base.translate.views == [] and base.train.non_aligned is False and base.refine.enabled is False
    for t in translators:
        other = load_experiment(TRANSLATE / f"translate_{world}_emb_{t}.json")
        assert other.translate.views, t
        assert _differences(base, other) <= ALLOWED, (t, _differences(base, other) - ALLOWED)


def test_embedder_settings_do_not_follow_the_main_experiments(tmp_path):
    """The lead may change demo.json / uavsar.json (backbone, epochs, non-aligned positives):
    the translator comparison must keep the settings its runs were made with."""
    exp_dir = tmp_path / "experiments"
    shutil.copytree(REPO / "experiments", exp_dir)
    for parent in ("demo.json", "uavsar.json"):
        p = exp_dir / parent
        d = json.loads(p.read_text())
        d["model"] = {**d.get("model", {}), "backbone": "resnet18", "pool": "gem", "embed_dim": 128}
        d["loss"] = {**d.get("loss", {}), "triplet": 0.5, "infonce": 2.0, "critic": 0.5}
        d["train"] = {**d.get("train", {}), "epochs": 99, "batch_size": 8, "lr": 0.1, "non_aligned": True, "val_fraction": 0.3, "seed": 7, "members": 3}
        d.setdefault("data", {})["img_size"] = 256
        p.write_text(json.dumps(d))
    for world, img, epochs in (("demo", 96, 6), ("uavsar", 64, 12)):
        exp = load_experiment(exp_dir / "translate" / f"translate_{world}_emb_cyclegan.json")
        ref = load_experiment(TRANSLATE / f"translate_{world}_emb_cyclegan.json")
        assert (exp.model.backbone, exp.model.pool, exp.model.embed_dim) == ("cmpc_cnn_s", "grid", 256)
        assert (exp.loss.triplet, exp.loss.infonce, exp.loss.critic) == (1.0, 1.0, 0.0)
        assert (exp.train.epochs, exp.train.batch_size, exp.train.lr, exp.train.non_aligned) == (epochs, 32, 0.001, False)
        assert (exp.train.val_fraction, exp.train.seed, exp.train.members, exp.data.img_size) == (0.1, 0, 1, img)
        assert _differences(exp, ref) == set()


def _fake_grid(path: Path, inputs: list[np.ndarray], fake_value: int) -> None:
    rows = [[x, np.full_like(x, fake_value), 255 - x] for x in inputs]
    save_grid(path, rows, ["sar (input)", "pseudo-opt", "opt (truth)"])


def test_comparison_grid_columns_and_mismatch(tmp_path):
    rng = np.random.default_rng(0)
    inputs = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(5)]
    _fake_grid(tmp_path / "a.png", inputs, 40)
    _fake_grid(tmp_path / "b.png", inputs, 200)
    out = comparison_grid([("A", tmp_path / "a.png"), ("B", tmp_path / "b.png")], tmp_path / "cmp.png", rows=3, scale=0.5, colours=256)
    from PIL import Image

    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    side, gap, head = 64, 2, 12  # 32 px tiles are enlarged to 128 by save_grid, then halved
    assert img.shape == (head + 3 * (side + gap) - gap, 4 * (side + gap) - gap, 3)
    cell = lambda r, c: img[head + r * (side + gap) + 8 : head + r * (side + gap) + side - 8, c * (side + gap) + 8 : c * (side + gap) + side - 8]
    # Columns: input | A | B | truth; the translated columns keep their own (constant) values.
    assert abs(cell(1, 1).mean() - 40) < 3 and abs(cell(1, 2).mean() - 200) < 3
    assert abs(cell(2, 0).mean() + cell(2, 3).mean() - 255) < 6
    _fake_grid(tmp_path / "c.png", inputs[::-1], 90)
    with pytest.raises(ValueError, match="another input patch"):
        comparison_grid([("A", tmp_path / "a.png"), ("C", tmp_path / "c.png")], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def _fake_study(root: Path) -> tuple[Path, Path]:
    """reports/ and runs/ as experiments/translate/study.sh leaves them, for one demo translator."""
    rng = np.random.default_rng(1)
    inputs = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(4)]
    reports, runs = root / "reports", root / "runs"
    ev = reports / "translate_demo_cyclegan" / "translate"
    ev.mkdir(parents=True)
    blocks = {}
    for d, val in (("sar2opt", 60), ("opt2sar", 120)):
        _fake_grid(ev / f"cyclegan_e008_{d}.png", inputs, val)
        blocks[d] = {"n": 40, "psnr_db": 14.25 if d == "sar2opt" else 17.5, "ssim": 0.312, "grid": str(ev / f"cyclegan_e008_{d}.png"),
                     "seg": {"mPA": 0.41, "mIoU": 0.29, "FwIoU": 0.5}, "seg_real": {"mPA": 0.8, "mIoU": 0.7, "FwIoU": 0.75},
                     "fid_seg": 3.21, "fid_seg_floor": 0.55}
    (ev / "cyclegan_e008.json").write_text(json.dumps({"meta": {"model": "cyclegan", "epoch": 8}, **blocks}))
    tr = runs / "translate_demo_cyclegan" / "translator"
    tr.mkdir(parents=True)
    (tr / "last.pt").write_bytes(b"x")
    (tr / "config.json").write_text(json.dumps({"translate": {"model": "cyclegan", "direction": "sar2opt", "patch_px": 64, "ngf": 16, "ndf": 16, "batch_size": 4}}))
    (tr / "log.jsonl").write_text("\n".join(json.dumps({"epoch": e, "step": 160 * e, "lr": 2e-4, "seconds": 45.0 * e, "g": 1.5, "cyc": 0.25}) for e in (1, 2)) + "\n")
    sel = reports / "translate_demo_select"
    sel.mkdir(parents=True)
    (sel / "translate_select.md").write_text("# Translator checkpoint selection: x\n\n| candidate | epoch |\n|---|---|\n| epoch_002.pt | 2 |\n")
    return reports, runs


def test_study_section_and_results_markers(tmp_path):
    from cmpc.translate.report import END, START, study_section, write_results

    reports, runs = _fake_study(tmp_path)
    section = study_section(reports, runs, tmp_path / "img")
    # Training row: 2 epochs x 160 steps, 90 s = 1.5 min, final losses; quality rows per direction.
    assert "| translate_demo_cyclegan | cyclegan | both | 64 | 16/16 | 2 x 160 | 4 | 1.5 | g 1.50, cyc 0.25 |" in section
    assert "| cyclegan | 8 | sar2opt | 40 | 14.25 | 0.312 | 0.410 | 0.290 | 0.500 | 3.21 (0.55) | - |" in section
    assert "| cyclegan | 8 | opt2sar | 40 | 17.50 |" in section
    assert "| epoch_002.pt | 2 |" in section and "Translator checkpoint selection" not in section
    assert (tmp_path / "img" / "translate_demo_sar2opt.png").is_file() and "uavsar" not in section
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\nbefore\n")
    write_results(md, section)
    write_results(md, section.replace("14.25", "15.00"))  # the second run replaces, never duplicates
    text = md.read_text()
    assert text.count(START) == 1 and text.count(END) == 1 and text.startswith("# Results\n\nbefore\n")
    assert "15.00" in text and "14.25" not in text


def test_seed_table_means_and_ranges(tmp_path):
    from cmpc.translate.report import seed_table

    def block(r1: float, err: float) -> dict:
        return {"aligned": {"n_queries": 10, "coarse": {"recall": {"1": r1, "5": 1.0}, "mAP": r1, "error_m": {"median": err, "within": {"25": r1}}}}}

    for seed, (none, p2p, ens) in enumerate(((0.5, 0.6, 0.7), (0.7, 0.8, 0.9))):
        d = tmp_path / f"translate_demo_ensemble_s{seed}"
        d.mkdir()
        test = {"translate_demo_emb_none_s%d" % seed: block(none, 10.0 * (seed + 1)), "translate_demo_emb_pix2pix_s%d" % seed: block(p2p, 0.0), "ensemble": block(ens, 0.0)}
        (d / "translate_ensemble.json").write_text(json.dumps({"test": test}))
    control = tmp_path / "translate_demo_control_s0"
    control.mkdir()
    members = [{"name": "translate_demo_emb_none_s0"}, {"name": "translate_demo_emb_none_s1"}]
    (control / "translate_ensemble.json").write_text(json.dumps({"meta": {"members": members}, "test": {"translate_demo_emb_none_s0": block(0.1, 0.0), "ensemble": block(0.75, 0.0)}}))
    md = seed_table(tmp_path, "demo")
    lines = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [line.split(" | ")[0] for line in lines] == ["| none", "| pix2pix", "| control: 2 no-translator embedders fused", "| ensemble"]
    assert lines[2].split(" | ")[2:4] == ["1", "0.750 (0.750-0.750)"]  # only the control's fused row counts
    assert lines[0] == "| none | aligned | 2 | 0.600 (0.500-0.700) | 1.000 (1.000-1.000) | 0.600 (0.500-0.700) | 15.0 (10.0-20.0) | 0.600 (0.500-0.700) |"
    assert "0.800 (0.700-0.900)" in lines[3] and md.startswith("Seeds 0, 1 ")
    assert seed_table(tmp_path, "uavsar") == ""
