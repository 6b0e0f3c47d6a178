"""Seeding, device choice and process-wide settings.

The functions that change the process (:func:`set_threads`, :func:`set_torch_threads`,
:func:`configure_embedder_training`, :func:`keep_freed_memory`) are for entry points only:
``cmpc.cli``, ``cmpc.pipeline`` and the benchmark scripts. Library code never calls them.
"""

from __future__ import annotations

import os
import random
import re
import sys

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


def set_torch_threads(threads: int | None) -> None:
    """Use ``threads`` torch CPU threads (a config's ``threads`` key); None = all cores
    (:func:`default_num_threads`)."""
    torch.set_num_threads(threads or default_num_threads())


def keep_freed_memory() -> None:
    """Ask glibc to keep freed blocks up to 256 MB in the heap instead of unmapping them.

    CPU training allocates and frees the same activation buffers (megabytes) every step; by
    default glibc returns them to the kernel and faults them back in, which cost 30 % of the
    CPU time of a step here (sys time; cmpc_cnn_s at 96 px: 145 -> 194 images per CPU second).
    No effect off glibc.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def configure_embedder_training(threads: int | None, device: str = "auto") -> None:
    """Process-wide settings for embedder training (``cmpc train emb|all``, ``cmpc translate
    select``, the demo).

    torch CPU threads: ``threads`` (``train.threads``), else all cores
    (:func:`default_num_threads`) shared among the ``WORLD_SIZE`` processes torchrun starts;
    when ``device`` (``train.device``) resolves to the CPU, :func:`keep_freed_memory`.
    """
    world = max(1, int(os.environ.get("WORLD_SIZE", "1")))
    torch.set_num_threads(threads or max(1, default_num_threads() // world))
    if resolve_device(device).type != "cuda":
        keep_freed_memory()
