"""Translators: networks, short training runs on tiny inputs, data contracts, one-line errors, CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cmpc.cli import main
from cmpc.config import TranslateConfig, experiment_from_dict
from cmpc.errors import CheckpointError, ConfigError, DataError
from cmpc.models.translators import create_translator
from cmpc.models.translators.base import ImagePool
from cmpc.models.translators.networks import (
    PatchDiscriminator,
    ResnetGenerator,
    UnetGenerator,
    patchgan_receptive_field,
    run_generator,
    unet_depth_for,
)
from cmpc.models.translators.seg import SegNet
from cmpc.translate.data import LabelRaster, Normalizer, aligned_pairs, fit_normalizer, read_split
from cmpc.translate.train import build_training_data, lr_at, train_translator

from translate_world import CRS, X0, Y0, experiment_dict, make_labels, make_world, render, write_raster


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # On the shared 2-core machine, 2 intra-op threads are ~10x slower than 1 for these tiny
    # convolutions (OpenMP threads wait on each other when the cores are busy).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("trworld")
    paths = make_world(tmp)
    paths["tmp"] = tmp
    return paths


def _exp(paths: dict[str, Path], tmp: Path, **translate):
    return experiment_from_dict(experiment_dict(paths, tmp, **translate))


# --------------------------------------------------------------------------- networks


def test_unet_depth_and_shapes():
    assert [unet_depth_for(p) for p in (32, 64, 256)] == [5, 6, 8]
    g = UnetGenerator(1, 3, ngf=8, depth=5)
    y = g(torch.randn(2, 1, 32, 32))
    assert y.shape == (2, 3, 32, 32) and y.abs().max() <= 1.0
    # Fully convolutional: a 40 x 36 patch is padded to multiples of 32 and cropped back.
    assert run_generator(g, torch.randn(1, 1, 40, 36)).shape == (1, 3, 40, 36)


def test_resnet_generator_and_patchgan_fields():
    g = ResnetGenerator(2, 3, ngf=8, n_blocks=2)
    assert g(torch.randn(1, 2, 32, 32)).shape == (1, 3, 32, 32)
    assert [patchgan_receptive_field(n) for n in (1, 2, 3)] == [16, 34, 70]
    # The 70x70 PatchGAN on a 256 px image gives the 30 x 30 logit map of pix2pix.
    assert PatchDiscriminator(6, ndf=8, n_layers=3)(torch.randn(1, 6, 256, 256)).shape == (1, 1, 30, 30)


def test_image_pool():
    pool = ImagePool(2, random.Random(0))
    a = torch.zeros(2, 1, 2, 2)
    assert torch.equal(pool.query(a), a)  # filling: returns the new images
    b = torch.ones(8, 1, 2, 2)
    out = pool.query(b)
    # Each image is either the new one (1) or an old one swapped out of the pool (0).
    old = int((out.flatten(1).mean(1) == 0).sum())
    assert 1 <= old <= 2 and out.shape == b.shape
    assert torch.equal(ImagePool(0).query(b), b)


def test_lr_schedule_constant_then_linear():
    assert [round(lr_at(e, 4, 1.0), 4) for e in range(4)] == [1.0, 1.0, 0.6667, 0.3333]


def test_normalizer_round_trip_and_pairs(world):
    rng = np.random.default_rng(0)
    arrs = [rng.normal(-10, 3, (2, 8, 8)).astype(np.float32) for _ in range(4)]
    n = fit_normalizer(arrs)
    u = n.to_unit(arrs[0])
    assert u.min() >= -1 and u.max() <= 1
    inside = (arrs[0] > n.lo[0]) & (arrs[0] < n.hi[0])
    assert np.allclose(n.from_unit(u)[inside], arrs[0][inside], atol=1e-4)
    assert Normalizer.from_dict(n.to_dict()) == n
    sar, opt = read_split(world["root"], "train")
    pairs = aligned_pairs(sar, opt)
    assert len(pairs) == len(opt) == len(sar) // 2  # one aligned query per reference
    assert all(sar[i].id == opt[j].id and sar[i].aligned for i, j in pairs)


# --------------------------------------------------------------------------- learning


def _tiny_batches(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    lab = make_labels(seed)
    opt, sar = render(lab, seed)
    o = torch.from_numpy(opt.astype(np.float32) / 127.5 - 1)
    s = torch.from_numpy(np.clip((sar + 30) / 17.5 - 1, -1, 1))
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ys = torch.randint(0, 96, (4,), generator=g)
        xs = torch.randint(0, 96, (4,), generator=g)
        out.append({
            "sar": torch.stack([s[:, y : y + 32, x : x + 32] for y, x in zip(ys, xs)]),
            "opt": torch.stack([o[:, y : y + 32, x : x + 32] for y, x in zip(ys, xs)]),
            "sar_label": torch.stack([torch.from_numpy(lab[y : y + 32, x : x + 32].astype(np.int64)) for y, x in zip(ys, xs)]),
        })
        out[-1]["opt_label"] = out[-1]["sar_label"]
    return out


def _quick_segnet(batches, mode: str) -> SegNet:
    torch.manual_seed(0)
    net = SegNet(batches[0][mode].shape[1], 4, width=8)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for b in batches * 2:
        loss = F.cross_entropy(net(b[mode]), b[f"{mode}_label"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


@pytest.mark.parametrize("name,key", [("pix2pix", "G_l1"), ("cyclegan", "cycle")])
def test_translator_losses_fall(name, key):
    torch.manual_seed(0)
    batches = _tiny_batches(12)
    cfg = TranslateConfig(model=name, patch_px=32, ngf=8, ndf=8, n_blocks=2, lr=1e-3, seed=0)
    model = create_translator(name, cfg, 1, 3)
    losses = [model.train_step(b)[key] for b in batches + batches]
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < 0.8 * first, f"{name}: {key} {first:.3f} -> {last:.3f}"
    for d in model.directions:
        src = batches[0]["sar" if d == "sar2opt" else "opt"]
        y = model.translate(src, d)
        assert y.shape == (4, 3 if d == "sar2opt" else 1, 32, 32)
        assert y.min() >= -1 and y.max() <= 1
    assert set(model.directions) == ({"sar2opt"} if name == "pix2pix" else {"sar2opt", "opt2sar"})


@pytest.mark.slow
def test_segcyclegan_seg_loss_keeps_structure():
    """Same seed, same steps: only the segmentation term differs from CycleGAN, and it must make
    the frozen judges' loss on held-out translations fall further."""
    torch.manual_seed(0)
    batches = _tiny_batches(12)
    held = _tiny_batches(2, seed=5)
    seg = {"opt": _quick_segnet(batches, "opt"), "sar": _quick_segnet(batches, "sar")}

    def judged(model) -> float:
        with torch.no_grad():
            return float(np.mean([
                F.cross_entropy(seg["opt"](model.translate(b["sar"], "sar2opt")), b["sar_label"]).item()
                + F.cross_entropy(seg["sar"](model.translate(b["opt"], "opt2sar")), b["opt_label"]).item()
                for b in held
            ]))

    out = {}
    for name in ("cyclegan", "segcyclegan"):
        cfg = TranslateConfig(model=name, patch_px=32, ngf=8, ndf=8, n_blocks=2, lr=1e-3, seed=0, lambda_seg=10.0)
        torch.manual_seed(0)
        model = create_translator(name, cfg, 1, 3, **({"seg_opt": seg["opt"], "seg_sar": seg["sar"]} if name == "segcyclegan" else {}))
        before = judged(model)
        logs = [model.train_step(b) for b in batches]
        out[name] = (before, judged(model), logs)
    (b_cg, a_cg, _), (b_sg, a_sg, logs) = out["cyclegan"], out["segcyclegan"]
    assert b_cg == pytest.approx(b_sg)  # identical start
    assert a_sg < b_sg - 0.1, f"seg loss {b_sg:.3f} -> {a_sg:.3f}"
    assert a_sg < a_cg - 0.05, f"Seg-CycleGAN {a_sg:.3f} vs CycleGAN {a_cg:.3f}"
    assert {"seg_opt", "seg_sar", "seg", "cycle"} <= set(logs[0])
    # The judges stay frozen (their weights are not the translator's to train).
    assert all(not p.requires_grad for net in seg.values() for p in net.parameters())


@pytest.mark.parametrize("name,directions", [("pix2pix", ["sar2opt"]), ("cyclegan", ["opt2sar", "sar2opt"])])
def test_registry_builds_translators_that_map_between_band_counts(name, directions):
    """A translator named in an experiment is built by name and maps SAR bands to optical
    bands (and back for CycleGAN) at any size, inside the [-1, 1] range of the data."""
    cfg = TranslateConfig(ngf=4, ndf=4, n_blocks=1, patch_px=32)
    model = create_translator(name, cfg, 2, 3)
    assert sorted(model.directions) == directions
    channels = {"sar2opt": (2, 3), "opt2sar": (3, 2)}
    for d in directions:
        src, dst = channels[d]
        y = model.translate(torch.rand(2, src, 32, 48) * 2 - 1, d)
        assert y.shape == (2, dst, 32, 48)
        assert float(y.abs().max()) <= 1.0 and float(y.std()) > 0  # tanh output, not a constant
    with pytest.raises(ConfigError, match="valid"):
        create_translator("pix2pixx", cfg, 2, 3)


# --------------------------------------------------------------------------- bad input


def test_pix2pix_on_unpaired_dataset_is_one_line_error(tmp_path):
    paths = make_world(tmp_path, aligned=False)
    exp = _exp(paths, tmp_path, model="pix2pix")
    with pytest.raises(DataError) as e:
        build_training_data(exp, "pix2pix")
    assert "aligned" in str(e.value) and "cyclegan" in str(e.value) and "\n" not in str(e.value)
    build_training_data(exp, "cyclegan")  # unpaired data is fine for CycleGAN


@pytest.mark.parametrize(
    "kind,kwargs,needle",
    [
        ("crs", {"crs": "EPSG:32632"}, "CRS"),
        ("shift", {"x0": X0 + 0.5}, "shifted"),
        ("pixel", {"res": 2.0}, "pixel size"),
        ("extent", {"x0": X0 + 16.0}, "does not cover"),
    ],
)
def test_misaligned_label_raster_is_one_line_error(world, tmp_path, kind, kwargs, needle):
    lab = make_labels(0)
    bad = write_raster(tmp_path / f"labels_{kind}.tif", lab, **kwargs)
    with pytest.raises(DataError) as e:
        LabelRaster(bad, optical=world["optical"])
    assert needle in str(e.value) and "not aligned" in str(e.value) and "\n" not in str(e.value)
    LabelRaster(world["labels"], optical=world["optical"])  # the aligned one opens


def test_label_raster_in_another_crs_than_the_dataset(world, tmp_path):
    bad = write_raster(tmp_path / "labels_4326.tif", make_labels(0), crs="EPSG:32632")
    with pytest.raises(DataError, match="has CRS EPSG:32632, the dataset has EPSG:32631"):
        LabelRaster(bad, optical=None, crs=CRS)


def test_label_raster_reads_the_footprint(world):
    lr = LabelRaster(world["labels"], optical=world["optical"], crs=CRS)
    lab = make_labels(0)
    sar, opt = read_split(world["root"], "test")
    for a in opt[:3] + sar[:3]:
        c, r = int(a.bounds[0] - X0), int(Y0 - a.bounds[3])
        assert np.array_equal(lr.read(a.bounds, (32, 32)), lab[r : r + 32, c : c + 32])
    # Outside the raster: no label (-1).
    assert (lr.read((X0 - 64, Y0 - 32, X0 - 32, Y0), (32, 32)) == -1).all()


def test_checkpoint_for_other_bands_or_size_is_one_line_error(world, tmp_path, capsys):
    exp = _exp(world, tmp_path, model="pix2pix", out=str(tmp_path / "p2p"))
    ckpt = train_translator(exp, progress=False)
    ck = torch.load(ckpt, weights_only=True)
    assert ck["kind"] == "translator" and ck["source_px"] == [32, 32] and ck["sar_channels"] == 1
    assert (tmp_path / "p2p" / "epoch_001.pt").is_file()
    other = make_world(tmp_path / "two_band", sar_bands=2)
    cfg = experiment_dict(other, tmp_path / "two_band", model="pix2pix")
    p = tmp_path / "two.json"
    p.write_text(json.dumps(cfg))
    capsys.readouterr()
    rc = main(["translate", "apply", str(p), "--checkpoint", str(ckpt), "--out", str(tmp_path / "never")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "1-band SAR" in err and "2" in err and "\n" not in err
    assert not (tmp_path / "never").exists()
    from cmpc.translate.apply import load_translator

    tr = load_translator(ckpt)
    with pytest.raises(CheckpointError, match="32x32 px patches, the data has 64x64"):
        tr.check_data(1, 3, (64, 64))


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_cli_train_eval_apply_cyclegan(world, tmp_path, capsys):
    cfg = experiment_dict(world, tmp_path, model="cyclegan", out=str(tmp_path / "cg"), max_steps_per_epoch=2, epochs=2, save_every=1)
    p = tmp_path / "cg.json"
    p.write_text(json.dumps(cfg))
    assert main(["translate", "train", str(p)]) == 0
    assert sorted(x.name for x in (tmp_path / "cg").glob("*.pt")) == ["epoch_001.pt", "epoch_002.pt", "last.pt", "state.pt"]
    log = [json.loads(line) for line in (tmp_path / "cg" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and log[1]["lr"] < log[0]["lr"]
    capsys.readouterr()
    assert main(["translate", "eval", str(p)]) == 0
    res = json.loads((tmp_path / "reports" / "translate" / "cyclegan_e002.json").read_text())
    for d in ("sar2opt", "opt2sar"):
        b = res[d]
        assert b["n"] == 16 and 0 < b["psnr_db"] < 60 and -1 <= b["ssim"] <= 1
        assert 0 <= b["seg"]["mIoU"] <= 1 and 0 <= b["seg_real"]["FwIoU"] <= 1 and b["fid_seg"] >= 0
        assert Path(b["grid"]).is_file()
    # The second FID variant: a (here untrained, tiny) embedder's pooled trunk features, no labels needed.
    from cmpc.config import ModelConfig
    from cmpc.models.checkpoint import embedder_payload, save_checkpoint
    from cmpc.models.embedder import build_embedder

    emb = tmp_path / "emb.pt"
    save_checkpoint(emb, embedder_payload(build_embedder(ModelConfig(backbone="mobilenetv3_small_050", embed_dim=16, stem_channels=8), 1, 3), 32))
    assert main(["translate", "eval", str(p), "--set", f"translate.fid_embedder={emb}", "--out", str(tmp_path / "ev2")]) == 0
    res2 = json.loads((tmp_path / "ev2" / "cyclegan_e002.json").read_text())
    assert res2["sar2opt"]["fid_emb"] >= 0 and res2["opt2sar"]["fid_emb_floor"] >= 0
    assert res2["sar2opt"]["psnr_db"] == pytest.approx(res["sar2opt"]["psnr_db"])  # same pairs, same translator
    assert main(["translate", "apply", str(p), "--direction", "opt2sar", "--out", str(tmp_path / "pseudo")]) == 0
    from cmpc.data.patches import read_patch_array
    from cmpc.data.layout import read_annotations

    anns = read_annotations(tmp_path / "pseudo", "test", "sar")
    assert len(anns) == len(read_annotations(world["root"], "test", "opt"))
    arr = read_patch_array(tmp_path / "pseudo" / "test" / "imgs" / "sar" / anns[0].file_path)
    assert arr.shape == (1, 32, 32) and arr.dtype == np.float32
    assert anns[0].extra["translated_from"] == "opt"


# --------------------------------------------------------------------------- auxiliary views


def test_translated_views_cache_and_swap(world, tmp_path):
    from types import SimpleNamespace

    from cmpc.data.patches import PatchDataset, read_patch_array, to_model_input
    from cmpc.translate.apply import load_translator
    from cmpc.translate.augment import TranslatedViews, with_translated_views

    p2p = train_translator(_exp(world, tmp_path, model="pix2pix", out=str(tmp_path / "p2p"), max_steps_per_epoch=1), progress=False)
    cg = train_translator(_exp(world, tmp_path, model="cyclegan", out=str(tmp_path / "cg"), max_steps_per_epoch=1), progress=False)
    root = world["root"]
    views = TranslatedViews([p2p, cg], root, "train", 32, cache_dir=tmp_path / "views", progress=False)
    assert views.count("opt") == 2 and views.count("sar") == 1  # pix2pix sar2opt; CycleGAN both ways
    files = sorted((tmp_path / "views").glob("*.h5"))
    assert len(files) == 2
    # A cached view is the translation of that very patch, standardised like a model input.
    tr = load_translator(cg)
    sar_anns = views.annotations["sar"]
    raw = read_patch_array(root / "train" / "imgs" / "sar" / sar_anns[3].file_path)
    want = to_model_input(tr.translate_arrays([raw], "sar2opt")[0], 32)
    got = views.view("opt", 3, k=1)
    assert got.shape == (3, 32, 32) and torch.allclose(got, want, atol=2e-2)
    uncached = TranslatedViews([cg], root, "train", 32, cache_dir=None, progress=False)
    assert torch.allclose(uncached.view("opt", 3), want, atol=1e-5)
    mtime = files[0].stat().st_mtime_ns
    TranslatedViews([p2p, cg], root, "train", 32, cache_dir=tmp_path / "views", progress=False)
    assert files[0].stat().st_mtime_ns == mtime  # reused, not recomputed

    optical = PatchDataset(root, "train", "opt", 32)
    sar = PatchDataset(root, "train", "sar", 32)
    pairs = SimpleNamespace(optical=optical, sar=sar)
    exp = _exp(world, tmp_path, views=[str(cg)], view_prob=1.0)
    exp.runs_dir = str(tmp_path / "runs")
    swapped = with_translated_views(exp, pairs, progress=False)
    assert pairs.optical is optical and pairs.sar is sar  # validation keeps the real patches
    torch.manual_seed(0)
    loads = [swapped.optical.load(i) for i in range(len(optical))]
    real = [optical.load(i) for i in range(len(optical))]
    # Probability 1, both directions: every optical load is either real or pseudo-optical of its aligned SAR.
    n_swapped = sum(not torch.equal(a, b) for a, b in zip(loads, real))
    assert 0 < n_swapped < len(loads)  # half the probability goes to the SAR side
    aligned = {a.id: q for q, a in enumerate(sar.annotations) if a.aligned}
    for i, (a, b) in enumerate(zip(loads, real)):
        if not torch.equal(a, b):
            assert torch.allclose(a, swapped.translated_views.view("opt", aligned[optical.annotations[i].id]), atol=1e-6)
    none = with_translated_views(_exp(world, tmp_path, views=[str(cg)], view_prob=0.0), pairs, progress=False)
    assert all(torch.equal(none.optical.load(i), real[i]) for i in range(5))


def test_multiband_sar_channels_follow_the_data(tmp_path):
    paths = make_world(tmp_path, sar_bands=2)
    exp = _exp(paths, tmp_path, model="cyclegan")
    data, facts = build_training_data(exp, "cyclegan")
    assert facts["sar_channels"] == 2 and facts["opt_channels"] == 3 and facts["source_px"] == [32, 32]
    assert len(facts["normalizers"]["sar"]["lo"]) == 2
    batch = torch.utils.data.default_collate([data[i] for i in range(2)])
    assert batch["sar"].shape == (2, 2, 32, 32) and batch["opt"].shape == (2, 3, 32, 32)
    model = create_translator("cyclegan", exp.translate, 2, 3)
    model.train_step(batch)
    assert model.translate(batch["opt"], "opt2sar").shape == (2, 2, 32, 32)


def test_interrupted_training_resumes_after_the_last_finished_epoch(world, tmp_path, monkeypatch):
    """A crash after epoch 2's log line (before its state is saved) resumes after epoch 1:
    epoch 1's checkpoint is kept, epochs 2-3 are (re)trained, the log has each epoch once and
    the step count continues; a finished run is not retrained."""
    import cmpc.translate.train as tt

    exp = _exp(world, tmp_path, model="pix2pix", out=str(tmp_path / "p2p"), epochs=3, max_steps_per_epoch=2, save_every=1)
    real_append = tt.append_jsonl
    calls = {"n": 0}

    def crash_on_second(path, rec):
        calls["n"] += 1
        real_append(path, rec)
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(tt, "append_jsonl", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        train_translator(exp, progress=False)
    out = tmp_path / "p2p"
    assert torch.load(out / "state.pt", weights_only=True)["epoch"] == 1
    e1 = (out / "epoch_001.pt").read_bytes()
    monkeypatch.setattr(tt, "append_jsonl", real_append)
    train_translator(exp, progress=False)
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [1, 2, 3] and [r["step"] for r in recs] == [2, 4, 6]
    assert (out / "epoch_001.pt").read_bytes() == e1
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["epoch"] == 3 and state["step"] == 6
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 3
    # Finished: a second call trains nothing; a run with other settings starts from scratch.
    mtime = (out / "last.pt").stat().st_mtime_ns
    train_translator(exp, progress=False)
    assert (out / "last.pt").stat().st_mtime_ns == mtime and len((out / "log.jsonl").read_text().splitlines()) == 3
    (out / "state.pt").unlink()  # runs saved before state.pt existed: last.pt at the final epoch says finished
    train_translator(exp, progress=False)
    assert (out / "last.pt").stat().st_mtime_ns == mtime and not (out / "state.pt").exists()
    exp.translate.lambda_l1 = 50.0
    train_translator(exp, progress=False)
    assert [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert (out / "epoch_001.pt").read_bytes() != e1
