"""What one acquisition sees: materials, heights and object identities on the ground grid.

A :class:`Scene` is the common input of the optical and the SAR renderers. Arrays are
(H, W) on the world grid: row 0 is the northern edge, column 0 the western edge, one pixel
is ``gsd_m`` metres. Heights are metres above the (flat) ground.

Classes written to ``labels.tif`` (uint8):

====  ==========  ===============================================================
code  name        what
====  ==========  ===============================================================
0     bare        bare soil, farm tracks (gravel), construction sites
1     road        asphalt roads, bridges, paved plazas, parking lots, yards
2     building    roofs (building footprints as seen from above)
3     water       river, lakes, ponds
4     trees       forest, hedgerows, street, park and garden trees (canopy)
5     cropland    cultivated fields (crop type per parcel)
6     grass       lawns, parks, meadows, river banks
7     vehicle     cars and ships
====  ==========  ===============================================================

Shadow is not a class: it is illumination, rendered from the DSM (optical sun shadow,
SAR radar shadow). Classes describe the optical acquisition (the reference map).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

CLASS_NAMES: tuple[str, ...] = ("bare", "road", "building", "water", "trees", "cropland", "grass", "vehicle")

# Materials: finer than classes; they drive the optical albedo and the SAR backscatter.
SOIL, GRAVEL, CONSTRUCTION, ASPHALT, CONCRETE, ROOF, WATER, TREE, CROP, GRASS, VEHICLE = range(11)
MATERIAL_NAMES: tuple[str, ...] = (
    "soil", "gravel", "construction", "asphalt", "concrete", "roof", "water", "tree", "crop", "grass", "vehicle",
)
MATERIAL_TO_CLASS = np.array([0, 0, 0, 1, 1, 2, 3, 4, 5, 6, 7], dtype=np.uint8)

# Land-use zones of the city blocks / rural parcels (one per Voronoi cell).
FIELD, MEADOW, FOREST, FALLOW, FARM, HOUSES, APARTMENTS, DOWNTOWN, INDUSTRIAL, PARK, PARKING, BUILDSITE = range(12)
ZONE_NAMES: tuple[str, ...] = (
    "field", "meadow", "forest", "fallow", "farm", "houses", "apartments", "downtown", "industrial", "park",
    "parking", "buildsite",
)
URBAN_ZONES = np.array([HOUSES, APARTMENTS, DOWNTOWN, INDUSTRIAL, PARK, PARKING, BUILDSITE])

# Crop types of FIELD / FARM parcels.
CROP_NAMES: tuple[str, ...] = ("wheat", "maize", "rapeseed", "beet", "ploughed", "hay")


@dataclass
class ObjectTable:
    """Per-object attributes, row ``i`` describes object id ``i`` (row 0 = "none").

    ``cols`` maps a name to a 1-D or 2-D array with ``n + 1`` rows.
    """

    cols: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return 0 if not self.cols else len(next(iter(self.cols.values()))) - 1

    def __getitem__(self, key: str) -> np.ndarray:
        return self.cols[key]


@dataclass
class Scene:
    """One acquisition's ground truth on the world grid (see the module docstring).

    - ``material`` (H, W) uint8 material code; ``labels`` (H, W) uint8 class code
    - ``dsm`` (H, W) float32 surface height above ground, metres
    - ``building_id`` / ``tree_id`` / ``vehicle_id`` / ``parcel_id`` (H, W) int32 object ids
      (0 = none) indexing ``buildings`` / ``trees`` / ``vehicles`` / ``parcels``
    - ``points`` (N, 4) float32 SAR point scatterers: row px, col px, height m, strength dB
    """

    gsd_m: float
    material: np.ndarray
    dsm: np.ndarray
    building_id: np.ndarray
    tree_id: np.ndarray
    vehicle_id: np.ndarray
    parcel_id: np.ndarray
    buildings: ObjectTable = field(default_factory=ObjectTable)
    trees: ObjectTable = field(default_factory=ObjectTable)
    vehicles: ObjectTable = field(default_factory=ObjectTable)
    parcels: ObjectTable = field(default_factory=ObjectTable)
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))

    @property
    def shape(self) -> tuple[int, int]:
        return self.material.shape  # type: ignore[return-value]

    @property
    def labels(self) -> np.ndarray:
        """(H, W) uint8 class mask (codes in :data:`CLASS_NAMES`)."""
        return MATERIAL_TO_CLASS[self.material]

    # ------------------------------------------------------------------ hand-made scenes

    @classmethod
    def flat(cls, height_px: int, width_px: int, gsd_m: float = 1.0, material: int = GRASS) -> "Scene":
        """A flat, homogeneous scene of one material (for tests and examples)."""
        shape = (height_px, width_px)
        parcels = ObjectTable(
            {
                "zone": np.array([MEADOW], np.uint8),
                "crop": np.zeros(1, np.uint8),
                "tone": np.zeros(1, np.float32),
                "row_angle": np.zeros(1, np.float32),
                "row_period_m": np.full(1, 4.0, np.float32),
            }
        )
        return cls(
            gsd_m=gsd_m,
            material=np.full(shape, material, np.uint8),
            dsm=np.zeros(shape, np.float32),
            building_id=np.zeros(shape, np.int32),
            tree_id=np.zeros(shape, np.int32),
            vehicle_id=np.zeros(shape, np.int32),
            parcel_id=np.zeros(shape, np.int32),
            buildings=ObjectTable(
                {
                    "height": np.zeros(1, np.float32),
                    "roof": np.zeros(1, np.uint8),
                    "colour": np.zeros((1, 3), np.float32),
                    "sar_db": np.zeros(1, np.float32),
                }
            ),
            trees=ObjectTable(
                {"colour": np.ones((1, 3), np.float32), "evergreen": np.zeros(1, bool), "hue": np.zeros(1, np.uint8)}
            ),
            vehicles=ObjectTable({"colour": np.zeros((1, 3), np.float32), "kind": np.zeros(1, np.uint8)}),
            parcels=parcels,
        )

    def add_box(
        self, row0: int, row1: int, col0: int, col1: int, height_m: float, roof_db: float = -9.0,
        colour: tuple[float, float, float] = (0.55, 0.55, 0.55),
    ) -> int:
        """Add a flat-roofed box building over rows [row0, row1) and columns [col0, col1);
        returns its id."""
        b = self.buildings
        bid = len(b) + 1
        b.cols["height"] = np.append(b["height"], np.float32(height_m))
        b.cols["roof"] = np.append(b["roof"], np.uint8(0))
        b.cols["colour"] = np.vstack([b["colour"], np.asarray(colour, np.float32)[None]])
        b.cols["sar_db"] = np.append(b["sar_db"], np.float32(roof_db))
        self.building_id[row0:row1, col0:col1] = bid
        self.material[row0:row1, col0:col1] = ROOF
        self.dsm[row0:row1, col0:col1] = height_m
        return bid
