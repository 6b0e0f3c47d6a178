"""cmpc: cross-modal (SAR -> optical) patch geo-localization.

Pipeline, one sub-package per step:
    data      -> synthetic world, GeoTIFF tiler, CMPC dataset layout, torch datasets
    models    -> pseudo-siamese embedder, losses, scene-graph refiner, translators
    train     -> trainers (embedding, refinement)
    index     -> FAISS index of optical references (+ HDF5 features, GeoPackage footprints)
    localize  -> SAR queries -> top-k -> refined positions
    evaluate  -> CMC / mAP / localization-error metrics and plots
"""

__version__ = "0.1.0"
