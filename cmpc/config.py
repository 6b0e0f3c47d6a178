"""Typed, validated experiment configuration.

One :class:`Experiment` flows through a run. It is loaded from a JSON file
(``experiments/*.json``), optionally ``extends`` another file, and takes command-line
overrides ``--set section.key=value``. Unknown keys, wrong types and out-of-range values are
one-line :class:`~cmpc.errors.ConfigError` messages that name the key and the valid choices.
The resolved configuration is saved next to every run's outputs (``config.json``).

Relative paths in a configuration are relative to the current working directory (run the
commands from the repository root).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from cmpc.errors import ConfigError
from cmpc.utils.io import atomic_write_json


def param(
    default: Any,
    *,
    lo: float | None = None,
    hi: float | None = None,
    gt: float | None = None,
    choices: tuple[Any, ...] | None = None,
    min_items: int | None = None,
    max_items: int | None = None,
    pattern: str | None = None,
    doc: str = "",
) -> Any:
    """A config field with optional checks and a one-line doc (with units).

    ``lo``/``hi``: inclusive range; ``gt``: exclusive lower bound; ``choices``: allowed values
    (per element for lists); ``min_items``/``max_items``: list length; ``pattern``: a regular
    expression a string must match in full (the doc then says what it accepts). Range and
    choices apply to every element of a list value.
    """
    meta = {"lo": lo, "hi": hi, "gt": gt, "choices": choices, "min_items": min_items, "max_items": max_items, "pattern": pattern, "doc": doc}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata=meta)
    return field(default=default, metadata=meta)


#: ``train.device`` / ``translate.device``: auto | cpu | cuda | cuda:N.
DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"

# --------------------------------------------------------------------------- sections


@dataclass
class SynthConfig:
    """Synthetic SAR/optical world (``cmpc data synth``)."""

    out: str = param("data/demo/world", doc="output folder for optical.tif, sar.tif, labels.tif, dsm.tif")
    seed: int = param(0, lo=0, doc="random seed; the world is deterministic per seed")
    size_m: float = param(2048.0, lo=64.0, hi=100_000.0, doc="side of the square world, metres")
    gsd_m: float = param(1.0, lo=0.05, hi=100.0, doc="ground sampling distance, metres/pixel")
    epsg: int = param(32631, lo=1024, hi=99999, doc="projected CRS (EPSG code) of the outputs")
    origin_x: float = param(500_000.0, doc="upper-left x of the world, metres in the CRS")
    origin_y: float = param(5_000_000.0, doc="upper-left y of the world, metres in the CRS")
    incidence_deg: float = param(35.0, lo=10.0, hi=70.0, doc="SAR incidence angle at scene centre, degrees")
    look: str = param("east", choices=("east", "west", "north", "south"), doc="SAR look direction (sensor on the opposite side)")
    looks: int = param(4, lo=1, hi=64, doc="equivalent number of looks L of the speckle (Gamma)")
    polarisations: int = param(1, choices=(1, 2, 4), doc="SAR bands: 1 (VV), 2 (VV, VH) or 4 (HH, HV, VH, VV)")
    sar_db: bool = param(True, doc="store SAR as dB (float32) instead of linear intensity")
    season: str = param("summer", choices=("spring", "summer", "autumn", "winter"), doc="optical season (vegetation colour)")
    sun_elevation_deg: float = param(45.0, lo=5.0, hi=90.0, doc="sun elevation for optical shadows, degrees")
    sun_azimuth_deg: float = param(150.0, lo=0.0, hi=360.0, doc="sun azimuth, degrees clockwise from north")
    haze: float = param(0.05, lo=0.0, hi=1.0, doc="optical haze strength")
    clouds: float = param(0.0, lo=0.0, hi=1.0, doc="fraction of the optical image under cloud")
    change_fraction: float = param(0.05, lo=0.0, hi=1.0, doc="share of buildings added/removed between acquisitions")
    misregistration_m: float = param(1.0, lo=0.0, hi=50.0, doc="max SAR/optical co-registration error, metres")
    building_density: float = param(1.0, lo=0.0, hi=3.0, doc="multiplier on the number of buildings")


@dataclass
class TileConfig:
    """Cutting co-registered rasters into a CMPC dataset (``cmpc data tile``)."""

    sar: str | None = param(None, doc="SAR GeoTIFF; null = <synth.out>/sar.tif")
    optical: str | None = param(None, doc="optical GeoTIFF; null = <synth.out>/optical.tif")
    patch_px: int = param(128, lo=16, hi=4096, doc="patch side, pixels of the optical raster")
    stride_px: int | None = param(None, lo=1, doc="reference grid stride, pixels; null = patch_px/2 (50 % overlap)")
    split: str = param("cross-area", choices=("cross-area", "same-area"), doc="train/test protocol")
    test_fraction: float = param(0.25, lo=0.0, hi=0.9, doc="share of the area (cross-area) or queries (same-area) used for test")
    block_m: float | None = param(None, lo=1.0, doc="cross-area block side, metres; null = one east strip")
    buffer_px: int | None = param(None, lo=0, doc="gap between train and test areas, pixels; null = patch_px")
    aligned: bool = param(True, doc="write aligned queries (same footprint as a reference)")
    non_aligned_per_ref: float = param(1.0, lo=0.0, hi=20.0, doc="non-aligned queries per reference (random positions)")
    nodata_max_frac: float = param(0.2, lo=0.0, hi=1.0, doc="skip patches with more nodata than this")
    near_k: int = param(8, lo=0, hi=256, doc="length of near_id lists")
    seed: int = param(0, lo=0, doc="random seed for non-aligned query positions")
    sar_bands: list[int] | None = param(None, lo=1, min_items=1, doc="1-based SAR band indexes to keep; null = all bands")
    optical_bands: list[int] | None = param(None, lo=1, min_items=1, doc="1-based optical band indexes to keep; null = all bands")
    crs: str | None = param(None, doc="dataset CRS (e.g. EPSG:32631); null = the optical CRS when its unit is the metre and its point scale factor at the data centre is within 0.002 of 1, else its local UTM zone (geographic, feet, Mercator)")
    reproject: bool = param(False, doc="warp the SAR raster to the optical CRS when they differ (else a CRS mismatch is an error)")
    block_px: int = param(1024, lo=16, hi=65536, doc="side of the windows read at once, pixels (memory ~ (block+patch)^2 x bands x 4 bytes)")
    pairs: str | None = param(None, doc="folder of NAME_sar.tif / NAME_optical.tif scene pairs, or a JSON/CSV list of pairs: every pair is tiled, touching pairs as one map (overlaps: the lowest name wins); null = the single pair tile.sar / tile.optical")
    test_blocks: list[list[float]] | None = param(None, min_items=1, doc="cross-area test boxes [[minx, miny, maxx, maxy], ...], metres in the dataset CRS (see cmpc data info); a footprint entirely inside one is test; null = east strip / tile.block_m")
    val_blocks: list[list[float]] | None = param(None, min_items=1, doc="validation boxes (with tile.test_blocks), metres in the dataset CRS; written into train/ and recorded in dataset.json, where the embedder trainer takes its validation from")
    buffer_m: float | None = param(None, lo=0.0, doc="with tile.test_blocks: gap between a train footprint and every test/validation box, metres; null = one patch")
    register: str | None = param(None, doc="a co-registration record (cmpc data coregistration --out FILE): move each SAR file by its measured content offset before tiling, so positions follow what the pixels show; every pair needs an entry (a single pair: its SAR file stem, or the record's only row); null = the files' own georeferencing")


@dataclass
class DataConfig:
    """The dataset a run reads (CMPC layout)."""

    root: str = param("data/demo/dataset", doc="dataset root (ROOT/{train,test}/...)")
    img_size: int = param(128, lo=16, hi=2048, doc="model input side, pixels (patches are resized)")
    num_workers: int = param(0, lo=0, hi=64, doc="DataLoader worker processes")
    augment: bool = param(True, doc="random flips/rot90 applied identically to both modalities, brightness jitter")
    cache: bool = param(True, doc="keep decoded patches in RAM during training")


@dataclass
class ModelConfig:
    """Pseudo-siamese embedder."""

    backbone: str = param("mobilenetv3_small_100", doc="any timm model name (features_only not required)")
    pretrained: bool = param(False, doc="use timm pretrained weights (needs them cached locally)")
    weights: str | None = param(None, doc="local weights file for the trunk (state_dict)")
    embed_dim: int = param(256, lo=8, hi=4096, doc="embedding dimension D")
    stem_channels: int = param(16, lo=3, hi=256, doc="channels out of each modality-specific stem")
    gem_p: float = param(3.0, lo=1.0, hi=10.0, doc="initial GeM pooling exponent")
    pool: str = param("gem", choices=("gem", "grid"), doc="gem: global GeM pooling; grid: 1x1-conv reduce, average to grid_size x grid_size cells, flatten (keeps the layout)")
    grid_size: int = param(4, lo=1, hi=16, doc="cells per side of the grid pooling (pool=grid)")
    grid_channels: int = param(32, lo=4, hi=1024, doc="channels per cell of the grid pooling (pool=grid)")
    share_trunk: bool = param(True, doc="share the trunk between modalities (pseudo-siamese stems stay separate)")
    sar_channels: int | None = param(None, lo=1, hi=64, doc="SAR input bands; null = from the data")
    optical_channels: int | None = param(None, lo=1, hi=64, doc="optical input bands; null = from the data")


@dataclass
class LossConfig:
    """Metric losses and modal alignment; weights of 0 switch a term off."""

    triplet: float = param(1.0, lo=0.0, doc="weight of the batch-hard triplet loss")
    margin: float = param(0.3, lo=0.0, hi=2.0, doc="triplet margin (cosine distance units)")
    infonce: float = param(1.0, lo=0.0, doc="weight of symmetric InfoNCE")
    temperature: float = param(0.07, lo=0.001, hi=1.0, doc="initial InfoNCE temperature (learnable)")
    critic: float = param(0.05, lo=0.0, doc="weight of the Wasserstein modal-alignment term")
    critic_steps: int = param(2, lo=1, hi=20, doc="critic updates per batch")
    critic_mode: str = param("gp", choices=("clip", "gp"), doc="Lipschitz constraint: weight clipping or gradient penalty")
    critic_clip: float = param(0.01, lo=1e-4, hi=1.0, doc="weight clip value (critic_mode=clip)")
    critic_gp: float = param(10.0, lo=0.0, doc="gradient-penalty weight (critic_mode=gp)")
    critic_hidden: int = param(256, lo=8, hi=4096, doc="critic MLP width")
    critic_lr: float = param(1e-4, lo=1e-7, hi=1.0, doc="critic learning rate")


@dataclass
class TrainConfig:
    """Embedding training."""

    epochs: int = param(20, lo=1, hi=10_000, doc="epochs")
    batch_size: int = param(32, lo=2, hi=4096, doc="locations per batch (each gives a SAR and an optical view)")
    lr: float = param(1e-3, lo=1e-7, hi=1.0, doc="AdamW learning rate")
    weight_decay: float = param(1e-4, lo=0.0, hi=1.0, doc="AdamW weight decay")
    warmup_epochs: float = param(1.0, lo=0.0, doc="linear warm-up, epochs; then cosine decay")
    seed: int = param(0, lo=0, doc="random seed")
    members: int = param(1, lo=1, hi=16, doc="embedders trained from seeds seed, seed+1, ... (runs/<name>/members/seed<N>/) and fused by score into runs/<name>/emb_best.pt (cmpc.models.fusion); 1 = one embedder")
    device: str = param("auto", pattern=DEVICE_PATTERN, doc="auto | cpu | cuda | cuda:N")
    amp: bool = param(True, doc="mixed precision on CUDA (ignored on CPU)")
    channels_last: bool = param(True, doc="channels_last memory format on CUDA")
    val_every: int = param(1, lo=1, doc="validate every N epochs")
    val_fraction: float = param(0.1, lo=0.0, hi=0.5, doc="share of training locations held out for validation")
    hard_negatives: str = param("geo+embedding", choices=("none", "geo", "embedding", "geo+embedding"), doc="batch composition")
    mining_start_epoch: int = param(1, lo=0, doc="first epoch (0-based) that uses embedding-mined negatives")
    threads: int | None = param(None, lo=1, hi=256, doc="torch CPU threads; null = all cores")
    max_steps_per_epoch: int | None = param(None, lo=1, doc="cap on steps per epoch (tests)")
    grad_clip: float = param(5.0, lo=0.0, doc="gradient norm clip; 0 = off")
    save_every_steps: int = param(100, lo=0, doc="also save runs/<name>/emb_last.pt every N steps, for resuming mid-epoch; 0 = epoch ends only")
    non_aligned: bool = param(False, doc="also train on non-aligned SAR queries (offset up to half a grid step) as positives of their nearest reference")
    hard_group: int = param(4, lo=1, hi=256, doc="locations pulled into a batch together as hard negatives (a location + its neighbours)")
    neighbours_k: int = param(8, lo=1, hi=256, doc="geographic / embedding neighbours a hard-negative group is drawn from")
    rotate: bool = param(True, doc="augmentation includes quarter turns (else flips only); both modalities get the same transform")
    ema: float = param(0.0, lo=0.0, hi=0.99999, doc="exponential moving average of the embedder weights, decay per step (e.g. 0.999; 0 = off); validated beside the raw weights at each validation, the better of the two (R@1, then R@5) is kept as emb_best.pt")


@dataclass
class IndexConfig:
    """FAISS index of the optical references (``cmpc index build``)."""

    name: str | None = param(None, doc="index/<name>/; null = the experiment name")
    factory: str = param("auto", doc="faiss index_factory string (Flat, HNSW32, IVF1024,Flat, IVF1024,PQ32,Refine(Flat), ...) or auto")
    split: str = param("test", choices=("train", "test"), doc="which split's optical references form the map")
    batch_size: int = param(64, lo=1, hi=65536, doc="references embedded per batch")
    nprobe: int = param(16, lo=1, hi=65536, doc="IVF cells visited per query")
    ef_search: int = param(64, lo=1, hi=65536, doc="HNSW efSearch")
    use_gpu: bool = param(True, doc="search on the GPU when one is present: faiss-gpu, or torch matmul+topk for Flat where faiss has no GPU")
    shards: int = param(1, lo=1, hi=4096, doc="split the map into this many FAISS files (shards/), searched as one; for maps past one machine's memory")
    mmap: bool = param(False, doc="memory-map the FAISS file(s) at query time instead of reading them into RAM")
    raster: str | None = param(None, doc="optical GeoTIFF mosaic to cut the references from (windowed, resumable) instead of a dataset split")
    patch_px: int | None = param(None, lo=8, hi=8192, doc="reference patch side when cutting index.raster, pixels; null = dataset.json patch_m of data.root / the raster GSD, else the model input size")
    stride_px: int | None = param(None, lo=1, doc="reference grid stride on index.raster, pixels; null = patch_px/2 (50 % overlap)")
    bands: list[int] | None = param(None, lo=1, min_items=1, doc="1-based bands of index.raster to use; null = all")
    resume: bool = param(True, doc="continue an interrupted raster build from its checkpointed blocks (index/.<name>.building/)")
    engine: str = param("faiss", choices=("faiss", "milvus"), doc="vector engine: faiss (in-process files, the default) or milvus (Milvus Lite file or a Milvus server, pip install 'cmpc[milvus]'; docs/SCALE.md)")
    uri: str | None = param(None, doc="index.engine=milvus: a local path ending in .db (Milvus Lite) or http(s)://host:19530 (Milvus server/cluster); null = milvus.db inside index/<name>/")
    dask: str | None = param(None, doc="embed index.raster on a Dask cluster: 'local' (a LocalCluster on this machine) or a scheduler address tcp://host:8786; null = in-process (pip install 'cmpc[dask]')")
    dask_workers: int | None = param(None, lo=1, hi=4096, doc="workers of the local Dask cluster (index.dask=local); null = CPU cores / dask_threads")
    dask_threads: int = param(1, lo=1, hi=256, doc="torch threads per Dask worker (local cluster: also its threads_per_worker)")


@dataclass
class RefineConfig:
    """Scene-graph refinement of the top-k candidates."""

    enabled: bool = param(True, doc="train and use the refiner")
    k: int = param(10, lo=2, hi=200, doc="candidates per query (graph nodes)")
    spatial_knn: int = param(4, lo=0, hi=64, doc="edges to the nearest candidates by position (0 = off)")
    feature_knn: int = param(4, lo=0, hi=64, doc="edges to the most similar candidates (0 = off)")
    hidden: int = param(128, lo=8, hi=2048, doc="GNN width")
    layers: int = param(3, lo=1, hi=16, doc="GNN layers")
    heads: int = param(4, lo=1, hi=32, doc="attention heads")
    epochs: int = param(30, lo=1, hi=10_000, doc="training epochs")
    batch_size: int = param(64, lo=1, hi=8192, doc="graphs per batch")
    lr: float = param(1e-3, lo=1e-7, hi=1.0, doc="learning rate")
    rank_margin: float = param(0.2, lo=0.0, hi=10.0, doc="ranking margin between correct and other candidates")
    position_weight: float = param(1.0, lo=0.0, doc="weight of the position regression loss")
    fine_align: bool = param(True, doc="estimate the sub-patch offset by dense feature correlation")
    fine_top: int = param(40, lo=1, hi=200, doc="candidates (of the localize.top_k) verified by dense alignment; the best peak wins (cost grows linearly, see docs/BENCHMARKS.md)")
    fine_spread_px: int = param(0, lo=0, hi=4096, doc="the fine_top candidates are taken in rank order skipping any whose centre lies within this many query pixels (at the embedder input size) of one already taken, so a dense reference grid's near-duplicates do not use up the alignments (the skipped ones fill up when fewer remain; raise localize.top_k to give it room); 0 = plain rank order")
    fine_max_shift_px: int | None = param(None, lo=0, doc="search radius of the dense alignment, query pixels (at the embedder input size); null = half the query side")
    fine_phases: bool = param(False, doc="refine the alignment peak to the pixel with 16 phase-shifted descriptor maps of the map (16x their memory and build time)")
    rerank: bool = param(True, doc="use the GNN's candidate order (false: keep the coarse order; ablations)")
    gnn_position: bool = param(True, doc="use the GNN's regressed position (false: centre of the refined top-1; ablations)")
    align_min_peak: float | None = param(None, lo=-1.0, hi=1.0, doc="alignment peaks (mean cosine for the learned descriptor; CFOG's are on their own, smaller scale) below this keep the fallback position (GNN or coarse, see gate); null = calibrated in training")
    gate: str = param("config", choices=("config", "calibrated"), doc="config: rerank / gnn_position as set here; calibrated: the policy (coarse order and position, GNN order, GNN position) and peak threshold that did best on the validation queries the refiner never trained on (a policy that lowers R@1 there is never chosen)")
    align_steps: int = param(400, lo=0, hi=1_000_000, doc="training steps of the dense alignment descriptor (0 = no fine alignment)")
    align_batch_size: int = param(16, lo=1, hi=4096, doc="SAR crops per alignment training step")
    align_lr: float = param(2e-3, lo=1e-7, hi=1.0, doc="alignment descriptor learning rate")
    align_dim: int = param(16, lo=4, hi=256, doc="dense descriptor channels")
    align_width: int = param(32, lo=8, hi=512, doc="dense descriptor network width")
    align_crop_px: int = param(64, lo=16, hi=4096, doc="SAR crop side in alignment training, pixels")
    align_shift_px: int = param(32, lo=4, hi=4096, doc="largest random offset between SAR crop and optical window in training, pixels")
    align_from: str | None = param(None, doc="take the fine-alignment descriptor from this refiner.pt instead of training one (it depends on the data, not the embedder)")
    aligner: str = param("learned", choices=("learned", "cfog"), doc="fine-alignment descriptor at query time: learned (the refiner's trained dense descriptor) or cfog (hand-made orientated-gradient channels, cmpc.models.cfog: nothing to train, no refiner.pt needed; its peaks are on their own scale, so set align_min_peak)")
    align_score: str = param("corr", choices=("corr", "zncc"), doc="alignment score: corr (mean dot product of the descriptors) or zncc (zero-mean normalised cross-correlation in [-1, 1]: windows full of strong structure are not favoured; stride-1 descriptors such as cfog only; align_min_peak is on its scale)")
    cfog_sigma: float = param(0.8, lo=0.0, hi=16.0, doc="CFOG: Gaussian smoothing of the orientated gradients, pixels")
    cfog_sar_sigma: float = param(1.0, lo=0.0, hi=16.0, doc="CFOG: Gaussian pre-smoothing of the SAR against speckle, pixels")
    scene_polish: str = param("none", choices=("none", "cfog", "cfog_refit"), doc="scene georeferencing (cmpc georef, cmpc eval scenes): after the learned dense descriptor has placed and decided a scene, cfog re-measures its translation with CFOG (cfog_sigma / cfog_sar_sigma; zero-mean normalised correlation) within scene_polish_m, heading and scale kept; cfog_refit then also aligns every tile within scene_polish_m of that and refits heading and scale (a bounded similarity, RANSAC). The decision is not changed. none: the learned descriptor's placement")
    scene_polish_m: float = param(50.0, lo=1.0, hi=10_000.0, doc="search radius of scene_polish, metres (east and north)")
    scene_polish_min_peak: float = param(0.1, lo=-1.0, hi=1.0, doc="scene_polish moves a placement only when its best correlation (zero-mean normalised, in [-1, 1]) reaches this; else the learned placement is kept")
    train_noise: float | None = param(None, lo=0.0, hi=4.0, doc="noise (norm, relative to the unit embeddings) added to training query embeddings each epoch so their top-k lists are as hard as unseen places; null = matched to the R@1 of the places the embedder did not train on (its validation block); 0 = off")
    seed: int = param(0, lo=0, doc="random seed of refiner training")


@dataclass
class LocalizeConfig:
    """Query-time settings (``cmpc localize``)."""

    top_k: int = param(20, lo=1, hi=1000, doc="candidates kept per query")
    batch_size: int = param(64, lo=1, hi=65536, doc="queries embedded per batch")
    prior: str | None = param(None, doc="GeoJSON polygon file restricting candidates")
    prior_center: list[float] | None = param(None, min_items=2, max_items=2, doc="[x, y] metres in the map CRS; with prior_radius_m")
    prior_radius_m: float | None = param(None, lo=0.0, doc="radius around prior_center, metres")
    raster_patch_px: int | None = param(None, lo=8, hi=8192, doc="patch side when tiling a SAR GeoTIFF, pixels; null = the index's patch size in metres / the raster GSD")
    raster_stride_px: int | None = param(None, lo=1, doc="stride when tiling a SAR GeoTIFF, pixels; null = raster_patch_px/2")
    raster_bands: list[int] | None = param(None, lo=1, min_items=1, doc="1-based bands of a SAR GeoTIFF to use; null = all")
    reproject: bool = param(False, doc="warp a query GeoTIFF in another projected CRS to the map CRS (resamples the SAR) instead of refusing it")
    raster_truth: bool = param(False, doc="a query GeoTIFF co-registered with the map: score each tile against its own georeferenced footprint centre (the correct reference: the nearest within half a stride); for evaluating on co-registered pairs, never an input to the answer")


@dataclass
class EvalConfig:
    """Evaluation (``test.py``)."""

    ks: list[int] = param([1, 5, 10, 20], lo=1, min_items=1, doc="recall@k cut-offs")
    thresholds_m: list[float] = param([1, 2, 5, 10, 25, 50, 100, 200], gt=0.0, min_items=1, doc="localization-error thresholds, metres")
    query_sets: list[str] = param(["aligned", "non_aligned"], choices=("aligned", "non_aligned", "all"), min_items=1, doc="query sets to evaluate")
    grid_queries: int = param(6, lo=0, hi=100, doc="queries shown in the retrieval grid")
    out: str | None = param(None, doc="report folder; null = reports/<name>")
    plots: bool = param(True, doc="write the PNG plots (CMC, error CDF, retrieval grid, error map)")


@dataclass
class TranslateConfig:
    """Image translators (``cmpc translate``) and their use as auxiliary views in embedding training."""

    model: str = param("pix2pix", choices=("pix2pix", "cyclegan", "segcyclegan"), doc="translator to train")
    direction: str = param("sar2opt", choices=("sar2opt", "opt2sar"), doc="pix2pix direction (CycleGANs learn both)")
    patch_px: int = param(64, lo=16, hi=1024, doc="training crop side, pixels of the dataset patches (generators are fully convolutional)")
    ngf: int = param(16, lo=4, hi=256, doc="generator width (reference: 64)")
    ndf: int = param(16, lo=4, hi=256, doc="discriminator width (reference: 64)")
    n_blocks: int = param(6, lo=1, hi=16, doc="ResNet generator blocks (reference: 9 at 256 px)")
    unet_depth: int | None = param(None, lo=2, hi=10, doc="U-Net down-samplings; null = log2(patch_px) (1x1 bottleneck)")
    disc_layers: int | None = param(None, lo=1, hi=5, doc="PatchGAN strided layers: 3 = 70x70 receptive field, 2 = 34x34, 1 = 16x16; null = by patch_px")
    epochs: int = param(10, lo=1, hi=10_000, doc="translator training epochs (lr decays linearly to 0 over the second half)")
    lr: float = param(2e-4, lo=1e-7, hi=1.0, doc="Adam learning rate (beta1 = 0.5)")
    batch_size: int = param(4, lo=1, hi=1024, doc="patches per step")
    max_steps_per_epoch: int | None = param(None, lo=1, doc="cap on steps per epoch (tests, quick runs)")
    lambda_l1: float = param(100.0, lo=0.0, doc="pix2pix L1 weight")
    lambda_cycle: float = param(10.0, lo=0.0, doc="CycleGAN cycle-consistency weight")
    lambda_identity: float = param(0.5, lo=0.0, doc="CycleGAN identity weight (x lambda_cycle); needs equal band counts")
    lambda_seg: float = param(1.0, lo=0.0, doc="Seg-CycleGAN segmentation loss weight")
    pool_size: int = param(50, lo=0, hi=10_000, doc="CycleGAN image pool of past fakes (0 = off)")
    label_raster: str | None = param(None, doc="class-mask GeoTIFF aligned with the optical raster; null = <synth.out>/labels.tif")
    seg_dir: str | None = param(None, doc="folder of the segmentation networks; null = <runs_dir>/seg/<dataset folder>")
    seg_epochs: int = param(8, lo=1, hi=10_000, doc="segmentation network training epochs")
    seg_width: int = param(16, lo=4, hi=256, doc="segmentation U-Net width")
    save_every: int = param(1, lo=1, doc="save a translator checkpoint every N epochs (checkpoint selection uses them)")
    out: str | None = param(None, doc="translator run folder; null = runs/<name>/translator")
    seed: int = param(0, lo=0, doc="random seed")
    device: str = param("auto", pattern=DEVICE_PATTERN, doc="auto | cpu | cuda | cuda:N")
    threads: int | None = param(None, lo=1, hi=256, doc="torch CPU threads; null = all cores")
    eval_split: str = param("test", choices=("train", "test"), doc="split whose aligned pairs the metrics use")
    eval_max: int = param(256, lo=1, doc="most patch pairs evaluated")
    fid_embedder: str | None = param(None, doc="embedder checkpoint whose pooled trunk features give a second FID variant (fid_emb); works without labels")
    checkpoint: str | None = param(None, doc="translator checkpoint for apply/eval; null = <out>/last.pt")
    views: list[str] = param([], doc="translator checkpoints whose outputs are extra views in embedding training")
    view_prob: float = param(0.3, lo=0.0, hi=1.0, doc="probability that a training location uses a translated view")
    cache_views: bool = param(True, doc="precompute translated views once into an HDF5 cache")
    select_epochs: int = param(3, lo=1, hi=1000, doc="embedder epochs per candidate in `cmpc translate select`")
    select_checkpoints: list[str] = param([], doc="candidates for `select`; empty = every epoch_*.pt in <out>")
    ensemble: list[str] = param([], doc="embedder checkpoints fused by `cmpc translate ensemble`")
    ensemble_trials: int = param(60, lo=1, hi=100_000, doc="Optuna trials tuning the fusion weights")
    ensemble_candidates: int = param(50, lo=1, hi=10_000, doc="top-k per model pooled before fused re-scoring")


SECTIONS: dict[str, type] = {
    "synth": SynthConfig,
    "tile": TileConfig,
    "data": DataConfig,
    "model": ModelConfig,
    "loss": LossConfig,
    "train": TrainConfig,
    "index": IndexConfig,
    "refine": RefineConfig,
    "localize": LocalizeConfig,
    "eval": EvalConfig,
    "translate": TranslateConfig,
}


@dataclass
class Experiment:
    """A whole experiment: its name, where outputs go, and one config per section."""

    name: str = "experiment"
    description: str = ""
    runs_dir: str = "runs"
    synth: SynthConfig = field(default_factory=SynthConfig)
    tile: TileConfig = field(default_factory=TileConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    localize: LocalizeConfig = field(default_factory=LocalizeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    translate: TranslateConfig = field(default_factory=TranslateConfig)

    # ---- derived paths (not stored) ----
    @property
    def run_dir(self) -> Path:
        """``runs/<name>/``: checkpoints, logs, resolved config."""
        return Path(self.runs_dir) / self.name

    @property
    def index_dir(self) -> Path:
        """``index/<index.name or name>/`` (the name must be a plain folder name: ConfigError)."""
        return Path("index") / validate_index_name(self.index.name or self.name, "index.name" if self.index.name else "name")

    @property
    def report_dir(self) -> Path:
        """``reports/<name>/`` unless ``eval.out`` is set."""
        return Path(self.eval.out) if self.eval.out else Path("reports") / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the resolved configuration as JSON (atomic)."""
        atomic_write_json(path, self.to_dict())


_TOP_KEYS = ("name", "description", "runs_dir", "extends")


# --------------------------------------------------------------------------- validation


#: Longest index name accepted (a folder name, with room for the ``.<name>.*`` siblings).
MAX_INDEX_NAME = 200


def validate_index_name(name: Any, key: str = "index.name") -> str:
    """``name`` when it is a plain folder name for ``index/<name>/``; else a one-line ConfigError.

    Like experiment names: not empty, no path separator, not ``.``/``..`` and not starting
    with ``.`` (the hidden ``index/.<name>.*`` siblings are the builds' work and lock files).
    """
    ok = (
        isinstance(name, str)
        and 0 < len(name) <= MAX_INDEX_NAME
        and not name.startswith(".")
        and not any(c in name for c in ("/", "\\", "\0"))
        and name.strip() == name
        and name.isprintable()
    )
    if not ok:
        raise ConfigError(
            f"config key '{key}': {name!r} must be a plain folder name under index/ (no '/' or '\\', "
            f"not starting with '.', at most {MAX_INDEX_NAME} characters)"
        )
    return name


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        (inner,) = get_args(tp) or (Any,)
        return f"list of {_type_name(inner)}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints accepted for floats).

    NaN and infinities are refused everywhere: no key takes them (JSON ``NaN``, ``--set
    x=NaN`` and ``Infinity`` parse as floats and would slip through every range check).
    """
    items = list(enumerate(value)) if isinstance(value, list) else [(None, value)]
    for i, v in items:
        if isinstance(v, float) and not math.isfinite(v):
            where = key if i is None else f"{key}[{i}]"
            raise ConfigError(f"config key '{where}': {json.dumps(v)} is not a finite number")
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {json.dumps(value)}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"config key '{key}': {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {json.dumps(value)}")
        (inner,) = get_args(tp) or (Any,)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {json.dumps(value)}")


def _check_range(value: Any, f: dataclasses.Field, key: str) -> None:
    meta = f.metadata
    if value is None:
        return
    if isinstance(value, list):
        lo_n, hi_n = meta.get("min_items"), meta.get("max_items")
        if lo_n is not None and len(value) < lo_n:
            want = f"exactly {lo_n}" if hi_n == lo_n else f"at least {lo_n}"
            raise ConfigError(f"config key '{key}': {json.dumps(value)} has {len(value)} item(s); it needs {want}")
        if hi_n is not None and len(value) > hi_n:
            want = f"exactly {hi_n}" if hi_n == lo_n else f"at most {hi_n}"
            raise ConfigError(f"config key '{key}': {json.dumps(value)} has {len(value)} item(s); it needs {want}")
    choices = meta.get("choices")
    lo, hi, gt = meta.get("lo"), meta.get("hi"), meta.get("gt")
    pattern = meta.get("pattern")
    vals = value if isinstance(value, list) else [value]
    for v in vals:
        if choices is not None and v not in choices:
            raise ConfigError(f"config key '{key}': {json.dumps(v)} is not one of {list(choices)}")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if not math.isfinite(v):
                raise ConfigError(f"config key '{key}': {json.dumps(v)} is not a finite number")
            if lo is not None and v < lo:
                raise ConfigError(f"config key '{key}': {v} is below the minimum {lo}")
            if gt is not None and v <= gt:
                raise ConfigError(f"config key '{key}': {v} must be above {gt}")
            if hi is not None and v > hi:
                raise ConfigError(f"config key '{key}': {v} is above the maximum {hi}")
        if pattern is not None and isinstance(v, str) and not re.fullmatch(pattern, v):
            raise ConfigError(f"config key '{key}': {json.dumps(v)} is not valid; expected {meta.get('doc') or pattern}")


def _build_section(cls: type, raw: Any, section: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"config section '{section}' must be an object, got {json.dumps(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key '{section}.{unknown[0]}'; valid keys in '{section}': {sorted(fields)}"
        )
    obj = cls()
    for name, value in raw.items():
        key = f"{section}.{name}"
        v = _coerce(value, hints[name], key)
        _check_range(v, fields[name], key)
        setattr(obj, name, v)
    return obj


def experiment_from_dict(raw: dict[str, Any]) -> Experiment:
    """Validate a plain dict (already merged) into an :class:`Experiment`."""
    if not isinstance(raw, dict):
        raise ConfigError("an experiment file must hold a JSON object")
    unknown = sorted(set(raw) - set(SECTIONS) - set(_TOP_KEYS))
    if unknown:
        raise ConfigError(
            f"unknown config key '{unknown[0]}'; valid top-level keys: {sorted(set(SECTIONS) | set(_TOP_KEYS) - {'extends'})}"
        )
    exp = Experiment()
    for key in ("name", "description", "runs_dir"):
        if key in raw:
            if not isinstance(raw[key], str) or (key != "description" and not raw[key]):
                raise ConfigError(f"config key '{key}': expected a non-empty string, got {json.dumps(raw[key])}")
            setattr(exp, key, raw[key])
    if "/" in exp.name or exp.name.startswith("."):
        raise ConfigError(f"config key 'name': {exp.name!r} must be a plain folder name")
    for section, cls in SECTIONS.items():
        if section in raw:
            setattr(exp, section, _build_section(cls, raw[section], section))
    return exp


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _read_json(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"experiment file not found: {path}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"malformed JSON in {path}: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: an experiment file must hold a JSON object")
    parent = raw.pop("extends", None)
    if parent is not None:
        if not isinstance(parent, str):
            raise ConfigError(f"{path}: 'extends' must be a file name")
        ppath = (path.parent / parent).resolve()
        if ppath in chain:
            raise ConfigError(f"{path}: circular 'extends' through {ppath.name}")
        raw = _deep_merge(_read_json(ppath, chain + (path.resolve(),)), raw)
    return raw


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value``; the value is JSON when it parses, else a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    key, _, value = text.partition("=")
    parts = key.strip().split(".")
    if not all(parts) or len(parts) > 2:
        raise ConfigError(f"--set {text!r}: expected section.key=value (or name=value)")
    try:
        parsed: Any = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return parts, parsed


def load_experiment(path: str | Path | None, overrides: list[str] | None = None, *, base: dict[str, Any] | None = None) -> Experiment:
    """Load, merge (``extends``), override (``--set``) and validate an experiment.

    ``path`` None gives the defaults (plus overrides), or ``base``: an experiment already
    read as a dict (e.g. a model card's ``experiment``, :mod:`cmpc.models.card`), copied and
    validated like a file's content.
    """
    if path is not None and base is not None:
        raise ConfigError("give an experiment file or a model's configuration, not both")
    raw: dict[str, Any] = _read_json(Path(path)) if path is not None else json.loads(json.dumps(base or {}))
    if path is not None and "name" not in raw:
        raw["name"] = Path(path).stem
    for text in overrides or []:
        parts, value = parse_override(text)
        if len(parts) == 1:
            raw[parts[0]] = value
        else:
            section, key = parts
            if section not in SECTIONS:
                raise ConfigError(f"--set {text!r}: unknown section '{section}'; valid: {sorted(SECTIONS)}")
            sec = raw.setdefault(section, {})
            if not isinstance(sec, dict):
                raise ConfigError(f"config section '{section}' must be an object")
            sec[key] = value
    return experiment_from_dict(raw)


def describe(section: str | None = None) -> str:
    """Human-readable list of config keys with defaults and docs (``cmpc config keys``)."""
    lines: list[str] = []
    for name, cls in SECTIONS.items():
        if section and name != section:
            continue
        lines.append(f"[{name}]")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            m = f.metadata
            extra = ""
            if m.get("choices"):
                extra = f" choices={list(m['choices'])}"
            lo, hi = m.get("lo"), m.get("hi")
            if lo is not None or hi is not None:
                extra += f" range=[{'' if lo is None else lo}, {'' if hi is None else hi}]"
            if m.get("gt") is not None:
                extra += f" range=({m['gt']}, ]"
            lines.append(f"  {f.name}: {_type_name(hints[f.name])} = {json.dumps(default)}{extra}  # {f.metadata.get('doc', '')}")
    return "\n".join(lines)
