"""Field checks for the records of COCO / LVIS instances files: the types and ranges that later stages rely on.

pycocotools, LVISEval and the proposer's loader trust these fields. A string `area` fails in the evaluation,
the last stage; a polygon of strings fails while the proposer trains; a polygon holding NaN or 1e30 makes
pycocotools' rasteriser run out of memory; an RLE whose counts do not add up to the image decodes to
garbage. `prepare` calls these functions while it streams each file once, so such a file is refused with one
line before anything runs.

Each function returns what is wrong, as a phrase for that line, or None when the record is fine; the caller
names the file and the record.
"""

from __future__ import annotations

import math

from pipeline.geometry.masks import is_short_polygon


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_int(value: object) -> bool:
    """A JSON integer (Python's bool is an int, but `true` is not an id or a size)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _finite_sum(values: list) -> bool:
    """Whether `values` are numbers with a finite sum: a string, None or list among them fails (fast on the
    millions of boxes and polygons of an LVIS file, where a check per value would not be)."""
    try:
        return math.isfinite(sum(values))
    except TypeError:
        return False


def image_problem(image: dict) -> str | None:
    """`width` and `height` must be positive integers (pixels)."""
    for key in ("width", "height"):
        value = image[key]
        if not is_int(value) or value <= 0:
            return f"{key!r} must be a positive integer, got {value!r}"
    return None


def category_problem(category: dict) -> str | None:
    """`name` a non-empty string; `synonyms`, where present, a list of strings (matched against COCO's names)."""
    name = category["name"]
    if not isinstance(name, str) or not name.strip():
        return f"'name' must be a non-empty string, got {name!r}"
    synonyms = category.get("synonyms", [])
    if not isinstance(synonyms, list) or not all(isinstance(s, str) for s in synonyms):
        return f"'synonyms' must be a list of strings, got {synonyms!r}"
    return None


def _polygon_problem(polygon: object, height: int, width: int) -> str | None:
    if not isinstance(polygon, list):
        return f"a polygon must be a list of coordinates, got {polygon!r}"
    if len(polygon) < 2:
        return None  # no point: a short polygon, counted or refused by the caller
    # plain Python on the list: a polygon has ~100 numbers, and numpy's per-call cost doubled the checks' time
    if not _finite_sum(polygon):
        bad = [v for v in polygon if not _is_number(v)]
        return f"polygon coordinates must be numbers, got {bad[0]!r}" if bad else "a polygon coordinate is not finite"
    xs, ys = polygon[0::2], polygon[1::2]
    # one image size of margin either side: real files overshoot the border by a pixel or so, never by this
    if not (-width <= min(xs) and max(xs) <= 2 * width and -height <= min(ys) and max(ys) <= 2 * height):
        return f"a polygon point lies far outside the {width}x{height} image"
    return None


def _rle_problem(rle: dict, height: int, width: int) -> str | None:
    if "counts" not in rle or "size" not in rle:
        return "an RLE segmentation needs 'counts' and 'size'"
    size = rle["size"]
    if not isinstance(size, list) or len(size) != 2 or [height, width] != size:
        return f"RLE 'size' {size!r} is not the image's [height, width] [{height}, {width}]"
    counts = rle["counts"]
    if isinstance(counts, list):
        if not all(is_int(c) and c >= 0 for c in counts):
            return "RLE 'counts' must be non-negative integers"
        if sum(counts) != height * width:
            return f"RLE 'counts' add up to {sum(counts)}, not the image's {height * width} pixels"
        return None
    if not isinstance(counts, str):
        return f"RLE 'counts' must be a list or a string, got {type(counts).__name__}"
    runs = compressed_rle_counts(counts)
    if runs is None or any(c < 0 for c in runs) or sum(runs) != height * width:
        return "RLE 'counts' is not a compressed RLE covering the image"
    return None


def compressed_rle_counts(text: str) -> list[int] | None:
    """The run lengths of a compressed RLE string (pycocotools' `rleFrString`), or None where it is cut short.

    pycocotools decodes a string whose runs do not cover the image into uninitialised memory, without an error,
    so the runs are read here to be checked. Each run is a little-endian base-32 number in characters from '0';
    0x20 marks a continued character, 0x10 the sign of the last; from the fourth on, runs are differences
    (to the run two before).
    """
    counts: list[int] = []
    pos = 0
    while pos < len(text):
        value, shift, more = 0, 0, True
        while more:
            if pos >= len(text):
                return None
            c = ord(text[pos]) - 48
            if not 0 <= c < 64:
                return None
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            pos += 1
            shift += 5
            if not more and c & 0x10:
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def segmentation_problem(segmentation: object, height: int, width: int) -> str | None:
    """Polygons (lists of finite numbers near the image) or an RLE of the image's size whose counts cover it."""
    if isinstance(segmentation, list):
        for polygon in segmentation:
            problem = _polygon_problem(polygon, height, width)
            if problem:
                return problem
        return None
    if isinstance(segmentation, dict):
        return _rle_problem(segmentation, height, width)
    return f"'segmentation' must be a list of polygons or an RLE object, got {type(segmentation).__name__}"


def short_polygon_count(segmentation: object) -> int:
    """How many polygons of a (checked) segmentation are short (`is_short_polygon`); 0 for an RLE."""
    if not isinstance(segmentation, list):
        return 0
    return sum(is_short_polygon(polygon) for polygon in segmentation)


def annotation_problem(annotation: dict, height: int, width: int) -> str | None:
    """`bbox` [x, y, w, h] of finite numbers with w, h >= 0; `area` a finite number >= 0; `iscrowd` 0 or 1;
    `segmentation` as `segmentation_problem` says (each only where present: the callers require the keys)."""
    bbox = annotation["bbox"]
    if not isinstance(bbox, list) or len(bbox) != 4 or not _finite_sum(bbox):
        return f"'bbox' must be [x, y, width, height] of finite numbers, got {bbox!r}"
    if bbox[2] < 0 or bbox[3] < 0:
        return f"'bbox' {bbox!r} has a negative width or height"
    if "area" in annotation:
        area = annotation["area"]
        if not (_is_number(area) and math.isfinite(area) and area >= 0):
            return f"'area' must be a finite number >= 0, got {area!r}"
    if "iscrowd" in annotation and annotation["iscrowd"] not in (0, 1):  # True/False compare equal to 1/0
        return f"'iscrowd' must be 0 or 1, got {annotation['iscrowd']!r}"
    if "segmentation" in annotation:
        return segmentation_problem(annotation["segmentation"], height, width)
    return None
