#!/usr/bin/env bash
# Cross-sensor / cross-place checks of the shipped model (weights/sentinel), no retraining:
# the s1s2 scene (Sentinel-1/2, France) and the UAVSAR pair (L-band airborne, North Carolina),
# through the user commands (`cmpc index build --model`, `cmpc localize --model`), each SAR
# tile scored against its own georeferenced centre (localize.raster_truth: the pairs are
# co-registered). Reports: reports/sentinel-s1s2/, reports/sentinel-uavsar/.
set -euo pipefail
cd "$(dirname "$0")/../.."
CMPC=".venv/bin/cmpc"
S=../shared/data/real/s1s2-gefolki
U=../shared/data/real/uavsar-nc/lngley_05521_09059_000_090813_L090_CX_01_pauli_x016_y020
mkdir -p data/cross
# s1s2: float SAR (two identical bands of linear power) and float reflectance, 10 m: converted to the card's conventions
$CMPC data convert-s1 $S/S1_patch11.tif data/cross/s1s2_sar.tif --band 1 > /dev/null
$CMPC data convert-s2 $S/S2_patch11.tif data/cross/s1s2_optical.tif --bands B02,B03,B04 > /dev/null
# UAVSAR: Pauli RGB + orthophoto, EPSG:4326 at ~5.6 m: warped to UTM 17N at 8.3 m (the model's GSD);
# the SAR input is the Pauli green channel (|HV|, the cross-polarised one, like Sentinel-1 VH)
.venv/bin/rio warp ${U}_optique.tif data/cross/uavsar_optical.tif --dst-crs EPSG:32617 --res 8.3 --resampling average --overwrite 2>/dev/null
.venv/bin/rio warp ${U}_radar.tif data/cross/uavsar_radar_8m.tif --dst-crs EPSG:32617 --res 8.3 --resampling average --overwrite 2>/dev/null
.venv/bin/python - <<'PY'
import rasterio
with rasterio.open("data/cross/uavsar_radar_8m.tif") as s:
    p = s.profile | {"count": 1, "nodata": 0}
    a = s.read(2)
with rasterio.open("data/cross/uavsar_sar.tif", "w", **p) as d:
    d.write(a, 1)
    d.set_band_description(1, "HV (Pauli green, L-band)")
with rasterio.open("data/cross/uavsar_optical.tif", "r+") as d:
    d.nodata = 0
PY
# HALF_PATCH=1 TAG=_half: the maps indexed every half patch (the card's grid before 2026-12-01)
# instead of the card's quarter patch (inputs.ref_stride_m), reports/sentinel-<set>_half
for set in s1s2 uavsar; do
  stride=()
  [ -n "${HALF_PATCH:-}" ] && stride=(--stride-px "$(.venv/bin/python -c "from cmpc.models.card import load_card; from cmpc.data.raster import open_raster
with open_raster('data/cross/${set}_optical.tif') as r: print(load_card('sentinel', verify=False).inputs.patch_px(r.grid.gsd_m) // 2)")")
  $CMPC index build --model sentinel --raster data/cross/${set}_optical.tif --name sentinel-$set${TAG:-} "${stride[@]}" > /dev/null
  $CMPC localize --model sentinel --index sentinel-$set${TAG:-} --queries data/cross/${set}_sar.tif \
    --set localize.raster_truth=true --set 'eval.thresholds_m=[5,10,25,50,100,200,640,1000]' --out reports/sentinel-$set${TAG:-} > /dev/null
done
