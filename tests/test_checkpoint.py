"""Checkpoints are data: round trip, corrupt files, pickled code refused, wrong input bands."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from cmpc.config import ModelConfig
from cmpc.errors import CheckpointError, ConfigError
from cmpc.models.checkpoint import embedder_payload, load_embedder, save_checkpoint
from cmpc.models.embedder import build_embedder

CFG = ModelConfig(backbone="cmpc_cnn_s", pool="grid", grid_size=2, embed_dim=16, stem_channels=8)


def _saved(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = build_embedder(CFG, 1, 3).eval()
    path = save_checkpoint(tmp_path / "emb.pt", embedder_payload(model, 32, epoch=3, metrics={"1": 0.5}))
    return path, model


def test_round_trip_rebuilds_the_same_model(tmp_path: Path) -> None:
    path, model = _saved(tmp_path)
    loaded, meta = load_embedder(path)
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(loaded(x, "sar"), model(x, "sar"))
    assert meta["epoch"] == 3 and meta["img_size"] == 32 and meta["model_cfg"]["pool"] == "grid"
    assert meta["hash"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_corrupt_checkpoint_is_one_line_error(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    for p in (truncated, garbage):
        with pytest.raises(CheckpointError) as e:
            load_embedder(p)
        assert "\n" not in str(e.value) and str(p) in str(e.value)
    with pytest.raises(CheckpointError, match="not found"):
        load_embedder(tmp_path / "missing.pt")


class _Payload:
    """Unpickling this would run code: ``Path.touch(marker)``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


def test_checkpoint_holding_code_is_refused_and_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pt"
    torch.save({"kind": "embedder", "model": _Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match="refusing to load") as e:
        load_embedder(evil)
    assert "\n" not in str(e.value)
    assert not marker.exists()  # weights_only=True: the reducer never ran


def test_wrong_input_bands_are_one_line_errors(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path)
    model, _ = load_embedder(path)
    with pytest.raises(ConfigError, match=r"sar input has 2 band\(s\) but the model was trained for 1"):
        model(torch.randn(1, 2, 32, 32), "sar")
    with pytest.raises(ConfigError, match=r"opt input has 1 band\(s\) but the model was trained for 3"):
        model.forward_pair(torch.randn(2, 1, 32, 32), torch.randn(2, 1, 32, 32))
    with pytest.raises(ConfigError, match=r"model.optical_channels is 4 but the data has 3"):
        build_embedder(ModelConfig(backbone="cmpc_cnn_s", optical_channels=4), 1, 3)


def test_forward_pair_matches_separate_forwards_in_eval_mode() -> None:
    torch.manual_seed(0)
    model = build_embedder(CFG, 1, 3).eval()
    sar, opt = torch.randn(3, 1, 32, 32), torch.randn(3, 3, 32, 32)
    a, b = model.forward_pair(sar, opt)
    assert torch.allclose(a, model(sar, "sar"), atol=1e-6) and torch.allclose(b, model(opt, "opt"), atol=1e-6)
    assert torch.allclose(a.norm(dim=1), torch.ones(3), atol=1e-6)
