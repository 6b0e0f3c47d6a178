"""experiments/sentinel/coregistration.py: mutual-information shift between a SAR and an
optical raster, on a hand-made pair with a known shift and a non-linear intensity relation."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter, shift as nd_shift

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("coregistration", ROOT / "experiments/sentinel/coregistration.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("dx,dy", [(2.0, -1.0), (-3.5, 2.5)])
def test_mi_shift_recovers_a_known_shift(dx: float, dy: float) -> None:
    co = _module()
    rng = np.random.default_rng(0)
    opt = gaussian_filter(rng.normal(size=(256, 256)), 3.0)
    opt = (opt - opt.min()) / (opt.max() - opt.min()) * 250 + 1
    # SAR content that the optical shows at p lies at p + (dx, dy); a non-monotone response
    sar = nd_shift(opt, (dy, dx), order=3, mode="nearest")
    sar = np.abs(np.sin(sar / 40.0)) * 254 + 1 + rng.normal(0, 5, sar.shape)
    sar = np.clip(sar, 1, 255)
    s = co.mi_shift(sar.astype(np.float32), opt.astype(np.float32), search=5, step=1)
    assert s["col"] == pytest.approx(dx, abs=0.35) and s["row"] == pytest.approx(dy, abs=0.35)
    assert not s["at_edge"] and s["contrast"] > 0.05
    # mutual information itself: independent values share (almost) none
    a, b = rng.integers(0, 255, 20000), rng.integers(0, 255, 20000)
    assert co.mutual_information(a, b) < 0.1 < co.mutual_information(a, a)
