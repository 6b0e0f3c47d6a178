"""Seeding, device choice and thread settings."""

from __future__ import annotations

import os
import random
import re

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cpu``/``cuda``/``cuda:N`` are taken as given.

    Anything else, or a CUDA device this machine does not have, is a one-line
    :class:`~cmpc.errors.ConfigError` (not a torch traceback mid-run).
    """
    from cmpc.errors import ConfigError

    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    m = re.fullmatch(r"cpu|cuda(?::(\d+))?", name)
    if m is None:
        raise ConfigError(f"device {name!r}: expected auto | cpu | cuda | cuda:N")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r}: CUDA is not available on this machine; set train.device (translate.device for the translators) to auto or cpu")
        n = torch.cuda.device_count()
        if m.group(1) is not None and int(m.group(1)) >= n:
            raise ConfigError(f"device {name!r}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
    return torch.device(name)


def default_num_threads() -> int:
    """Threads for torch on CPU: all cores unless CMPC_THREADS says otherwise."""
    env = os.environ.get("CMPC_THREADS")
    if env:
        return max(1, int(env))
    return max(1, os.cpu_count() or 1)


def set_threads(n: int) -> None:
    """Use ``n`` CPU threads in torch (intra-op) and in faiss (OpenMP)."""
    n = max(1, int(n))
    torch.set_num_threads(n)
    try:
        import faiss

        faiss.omp_set_num_threads(n)
    except ImportError:  # faiss is optional for training-only installs
        pass
