"""Two acquisitions of one world: the optical map and the SAR scene, taken at different times.

Between the two dates some buildings were demolished or built (``change_fraction`` of them,
half each way; the missing one shows as a building site), some single trees were cut or
planted, and every car and most ships moved. :func:`compose_scene` turns the static
:class:`~cmpc.data.synth.layout.Layout` plus the objects present at one date into a
:class:`~cmpc.data.synth.scene.Scene`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from cmpc.data.synth.layout import Layout
from cmpc.data.synth.objects import Buildings, Parts, Trees, raster_parts, raster_trees, stamp_max
from cmpc.data.synth.scene import CONSTRUCTION, ROOF, TREE, VEHICLE, ObjectTable, Scene


@dataclass
class Presence:
    """Which objects exist at one date: boolean per building id (row 0 unused) and per tree,
    the buildings whose site is a construction site at that date, and the vehicles."""

    buildings: np.ndarray
    sites: np.ndarray
    trees: np.ndarray
    vehicles: Parts
    vehicle_colour: np.ndarray
    vehicle_kind: np.ndarray


def split_changes(
    rng: np.random.Generator, n_buildings: int, n_trees: int, change_fraction: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Draw temporal changes: returns (buildings at date 1, at date 2, trees at 1, at 2),
    boolean arrays (buildings indexed by id, row 0 False). ``change_fraction`` of the
    buildings exist at one date only (half removed, half new); trees likewise."""
    b1 = np.ones(n_buildings + 1, bool)
    b1[0] = False
    b2 = b1.copy()
    n_change = int(round(change_fraction * n_buildings))
    if n_change:
        chosen = rng.choice(np.arange(1, n_buildings + 1), size=n_change, replace=False)
        removed, added = chosen[: (n_change + 1) // 2], chosen[(n_change + 1) // 2 :]
        b2[removed] = False
        b1[added] = False
    u = rng.random(n_trees)
    t1 = u >= change_fraction / 2
    t2 = (u < change_fraction / 2) | (u >= change_fraction)
    return b1, b2, t1, t2


def compose_scene(layout: Layout, buildings: Buildings, trees: Trees, present: Presence) -> Scene:
    """Rasterise the objects present at one date over the static layout."""
    shape = layout.shape
    h, w = shape
    material = layout.material.copy()
    dsm = layout.ground_h.copy()

    # Construction sites: footprints of buildings that exist only at the other date.
    site_parts = buildings.parts.take(present.sites[buildings.parts.owner])
    if len(site_parts.r):
        _, flat, _ = raster_parts(site_parts, shape)
        material.ravel()[flat] = CONSTRUCTION

    # Trees (individual crowns over the forest/hedgerow canopy).
    keep_t = np.flatnonzero(present.trees)
    th, tid = raster_trees(trees.take(keep_t), shape, ids=keep_t + 1)
    canopy = np.maximum(layout.canopy_h, th)
    tid[th < layout.canopy_h] = 0

    # Buildings: highest roof sample wins each pixel.
    bparts = buildings.parts.take(present.buildings[buildings.parts.owner])
    pidx, flat, z = raster_parts(bparts, shape)
    bh, bid = stamp_max(shape, flat, z, bparts.owner[pidx])
    has_b = bid > 0

    has_t = (canopy > 0) & ~has_b
    material[has_t] = TREE
    dsm[has_t] = np.maximum(dsm[has_t], canopy[has_t])
    material[has_b] = ROOF
    dsm[has_b] = bh[has_b]
    tid[~has_t] = 0

    # Vehicles under tree crowns are hidden (from above) and dropped.
    vp = present.vehicles
    pidx, flat, z = raster_parts(vp, shape, step=0.5)
    vh, vid = stamp_max(shape, flat, z, vp.owner[pidx])
    has_v = (vid > 0) & ~has_b & ~has_t
    material[has_v] = VEHICLE
    dsm[has_v] = layout.ground_h[has_v] + vh[has_v]
    vid[~has_v] = 0

    bt = buildings.table
    return Scene(
        gsd_m=layout.gsd_m,
        material=material,
        dsm=dsm.astype(np.float32),
        building_id=bid,
        tree_id=tid.astype(np.int32),
        vehicle_id=vid,
        parcel_id=layout.parcel_id,
        buildings=ObjectTable({k: bt[k] for k in ("height", "roof", "colour", "sar_db")}),
        trees=ObjectTable(
            {
                "colour": np.vstack([np.ones((1, 3), np.float32), trees.jitter]).astype(np.float32),
                "evergreen": np.concatenate([[False], trees.evergreen]),
                "hue": np.concatenate([[0], trees.hue]).astype(np.uint8),
            }
        ),
        vehicles=ObjectTable({"colour": present.vehicle_colour, "kind": present.vehicle_kind}),
        parcels=layout.parcels,
    )


def point_scatterers(
    rng: np.random.Generator, scene: Scene, layout: Layout, vehicles: Parts, vehicle_kind: np.ndarray
) -> np.ndarray:
    """Bright point targets for the SAR scene: rooftop clutter, street lamps along arterials,
    cars and ships. Returns (N, 4) float32: row px, col px, height m, strength dB (VV,
    relative to a 1 m^2 pixel; a corner reflector-like 10-25 dB)."""
    gsd = scene.gsd_m
    h, w = scene.shape
    pts: list[np.ndarray] = []
    # Rooftop clutter: about one per 250 m^2 of roof.
    roof = np.flatnonzero((scene.material == ROOF).ravel() & (rng.random(h * w) < gsd * gsd / 250.0))
    if roof.size:
        pts.append(np.stack([roof // w, roof % w, scene.dsm.ravel()[roof] + 0.5, rng.uniform(3.0, 14.0, roof.size)], 1))
    # Street lamps: one per ~30 m along each side of arterial roads, 8 m poles.
    art = layout.arterial & (layout.ground_h == 0)
    edge = art & ~ndi.binary_erosion(art)
    lamps = np.flatnonzero(edge.ravel() & (rng.random(h * w) < gsd / 30.0))
    if lamps.size:
        pts.append(np.stack([lamps // w, lamps % w, np.full(lamps.size, 8.0), rng.uniform(4.0, 10.0, lamps.size)], 1))
    # Cars: a bright point at the body; ships: several along the hull (superstructure, cranes).
    present = np.zeros(len(vehicle_kind), bool)
    present[np.unique(scene.vehicle_id[scene.vehicle_id > 0])] = True
    owner = vehicles.owner
    car = present[owner] & (vehicle_kind[owner] == 1)
    if car.any():
        pts.append(np.stack([vehicles.r[car], vehicles.c[car], np.full(car.sum(), 1.0), rng.uniform(0.0, 6.0, car.sum())], 1))
    ship = np.flatnonzero(present[owner] & (vehicle_kind[owner] == 2))
    for i in ship:
        k = int(rng.integers(3, 8))
        u = rng.uniform(-0.45, 0.45, k) * vehicles.length[i]
        pts.append(np.stack([vehicles.r[i] + u * np.sin(vehicles.angle[i]), vehicles.c[i] + u * np.cos(vehicles.angle[i]),
                             vehicles.height[i] + rng.uniform(0, 6, k), rng.uniform(12.0, 24.0, k)], 1))
    if not pts:
        return np.zeros((0, 4), np.float32)
    return np.concatenate(pts).astype(np.float32)

