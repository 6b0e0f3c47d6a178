"""GPU search (skipped without CUDA): faiss on the GPU (requirements-gpu.txt) equals faiss on the CPU.

The GPU install (docs/SCALE.md, "GPU install") replaces faiss-cpu with a faiss GPU build;
:meth:`cmpc.index.store.ReferenceIndex.load` then moves an index to the GPU when
``index.use_gpu`` and the queries run on CUDA. On an exact (Flat) index both must return the
same rows and scores. Without faiss-gpu but with CUDA, the torch matmul + topk path is checked
against the CPU instead (same contract).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmpc.index.factory import gpu_available

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")


@pytest.fixture(scope="module")
def flat_index(tmp_path_factory):
    """An index folder with 20k random unit vectors (D = 64), Flat, written like a real build."""
    import h5py

    from cmpc.index.writer import FeatureWriter, fill_faiss
    from cmpc.index.store import FEATURES_FILE, MANIFEST_FILE
    from cmpc.utils.io import atomic_write_json

    d = tmp_path_factory.mktemp("gpu") / "idx"
    d.mkdir()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20_000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    with h5py.File(d / FEATURES_FILE, "w") as h5:
        FeatureWriter(h5, 64).append_arrays(x, ids=np.arange(len(x)), positions=rng.random((len(x), 2)) * 1000,
                                            bounds=np.zeros((len(x), 4)), source=0, names=[""] * len(x), file_paths=[""] * len(x))
        fill_faiss(d, h5, "Flat", 64)
    (d / "footprints.gpkg").write_bytes(b"")
    atomic_write_json(d / MANIFEST_FILE, {"format": 1, "name": "gpu", "checkpoint": {"hash": "x"}, "embed_dim": 64, "factory": "Flat",
                                          "count": len(x), "crs": None, "extent": [0, 0, 1000, 1000], "sources": []})
    q = rng.standard_normal((257, 64)).astype(np.float32)
    return d, q / np.linalg.norm(q, axis=1, keepdims=True)


def test_gpu_search_equals_cpu_search_on_exact_index(flat_index):
    from cmpc.index.store import ReferenceIndex

    d, q = flat_index
    cpu = ReferenceIndex.load(d, backend="faiss")
    gpu = ReferenceIndex.load(d, use_gpu=True)
    assert cpu.backend == "faiss"
    if gpu_available():
        assert gpu.backend == "faiss-gpu", "faiss has GPU support but the index was not moved to the GPU"
    else:
        assert gpu.backend.startswith("torch-cuda"), gpu.backend  # no faiss-gpu: the torch path
    allowed = np.arange(0, 20_000, 3)
    for k, rows_allowed in ((1, None), (10, None), (50, None), (10, allowed)):
        s_cpu, r_cpu = cpu.search(q, k, rows_allowed)
        s_gpu, r_gpu = gpu.search(q, k, rows_allowed)
        np.testing.assert_allclose(s_gpu, s_cpu, atol=1e-4)
        # ties aside (none in random data at this precision), the same rows in the same order
        assert np.mean(r_gpu == r_cpu) > 0.999
    for i in range(5):  # single queries go through the same GPU index
        assert np.array_equal(gpu.search(q[i : i + 1], 10)[1], cpu.search(q[i : i + 1], 10)[1])
