"""Synthetic SAR/optical world generator (``cmpc data synth``), the embedded default dataset.

One module per step: :mod:`.layout` (density, roads, parcels, water, forests),
:mod:`.objects` (buildings with heights, trees, cars, ships), :mod:`.acquisition` (the two
dates and their differences), :mod:`.optical` and :mod:`.sar` (renderers), :mod:`.preview`
(side-by-side PNG) and :mod:`.world` (orchestration and GeoTIFF output). Classes of
``labels.tif`` are listed in :mod:`.scene`.
"""

from cmpc.data.synth.scene import CLASS_NAMES, Scene
from cmpc.data.synth.world import build_world, generate_world, read_world_meta

__all__ = ["generate_world", "build_world", "read_world_meta", "CLASS_NAMES", "Scene"]
