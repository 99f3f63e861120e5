"""COCO / LVIS annotation files read as streams, never parsed whole (LVIS v1 train is about 1 GB of JSON).

A parsed file costs about ten times its size in Python objects, so no stage loads one whole: top-level lists
are read item by item (ijson's C parser), and the annotations a stage needs again later (a proposer's
training images, every epoch) go to an unlinked temporary file indexed by image (`AnnotationIndex`), so a
process holds a few integers per annotation instead of its polygons. Errors are one line naming the file.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import tempfile
from array import array
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError

_EXACT_ERROR_BYTES = 64 << 20  # files up to this size are re-parsed whole for the error's line and column


def _json_error(path: Path, what: str, err: Exception, near: int | None = None) -> PipelineError:
    """A one-line "not valid JSON" error. A file up to 64 MB is re-parsed by the standard parser for the line and
    column (error path only); a larger one (LVIS train is 1 GB: parsed whole, several GB) gets ijson's message
    and ``near``, the byte offset the stream had read to when it failed."""
    try:
        if path.stat().st_size <= _EXACT_ERROR_BYTES:
            with path.open("r", encoding="utf-8") as f:
                json.load(f)
    except json.JSONDecodeError as exact:
        where = f"line {exact.lineno} column {exact.colno}"
        return PipelineError(f"{what}: {path}: not valid JSON ({exact.msg} at {where})")
    except UnicodeDecodeError as exact:
        return PipelineError(f"{what}: {path}: not valid JSON (not UTF-8 text: {exact.reason})")
    except (OSError, MemoryError):
        pass
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    where = f", within the first {near:,} bytes" if near else ""
    return PipelineError(f"{what}: {path}: not valid JSON ({first[:200]}{where})")


def _open(path: Path, what: str) -> io.BufferedReader:
    if not path.is_file():
        raise PipelineError(f"{what}: {path}: file not found")
    try:
        return path.open("rb")
    except OSError as err:
        raise PipelineError(f"{what}: {path}: cannot read ({err.strerror or err})") from None


def _read_to(f: io.BufferedReader) -> int | None:
    """How far the stream had read (the error lies before it, within one read buffer)."""
    try:
        return f.tell()
    except (OSError, ValueError):
        return None


def stream_items(path: Path | str, what: str, prefix: str) -> Iterator[Any]:
    """The JSON values at ijson `prefix` ("annotations.item", "images", "annotations.item.image_id"), one by one.

    Checks first that the file holds a JSON object; numbers come as int or float (never Decimal).
    """
    import ijson  # here: only the readers of annotation files need it

    path = Path(path)
    with _open(path, what) as f:
        try:
            events = ijson.parse(f)
            _, event, value = next(events)
            if event != "start_map":
                kind = {"start_array": "list", "string": "str", "null": "None", "boolean": "bool"}.get(event)
                kind = kind or (type(value).__name__ if event == "number" else event)
                raise PipelineError(f"{what}: {path}: expected a JSON object at the top level, got {kind}")
            f.seek(0)
            yield from ijson.items(f, prefix, use_float=True)
        except ijson.JSONError as err:
            raise _json_error(path, what, err, _read_to(f)) from None
        except StopIteration:
            raise PipelineError(f"{what}: {path}: not valid JSON (the file is empty)") from None
        except UnicodeDecodeError:
            raise _json_error(path, what, ValueError("not UTF-8 text"), _read_to(f)) from None
        except OSError as err:
            raise PipelineError(f"{what}: {path}: cannot read ({err.strerror or err})") from None


_MISSING = object()


def top_level_value(path: Path | str, what: str, key: str, default: Any = _MISSING) -> Any:
    """The whole value of one top-level key (for the small ones: "images", "categories"); `default` if absent,
    else a one-line error."""
    for value in stream_items(path, what, key):
        return value
    if default is _MISSING:
        raise PipelineError(f"{what}: {path}: missing top-level key {key!r}")
    return default


def load_image_records(path: Path | str, what: str, keys: Iterable[str] | None = None) -> list[dict]:
    """The `images` records of a file, read as a stream; with `keys`, each record keeps only those keys
    (a proposer needs id, size and file, not COCO's licence and Flickr fields)."""
    keep = None if keys is None else tuple(keys)
    records = []
    for record in stream_items(path, what, "images.item"):
        if not isinstance(record, dict) or "id" not in record:
            raise PipelineError(f"{what}: {path}: 'images' must be a list of records with an 'id'")
        records.append(record if keep is None else {k: record[k] for k in keep if k in record})
    if not records and top_level_value(path, what, "images") != []:  # absent, or not a list: say so
        raise PipelineError(f"{what}: {path}: 'images' must be a list of records with an 'id'")
    return records


def annotations_of(path: Path | str, what: str, image_ids: Iterable[int]) -> dict[int, list[dict]]:
    """The annotations of a few images (a preview's), in file order, by image id; one pass over the file."""
    wanted = {int(i): [] for i in image_ids}
    for ann in stream_items(path, what, "annotations.item"):
        bucket = wanted.get(ann.get("image_id")) if isinstance(ann, dict) else None
        if bucket is not None:
            bucket.append(ann)
    return wanted


class AnnotationIndex:
    """A file's annotations grouped by image, kept in an unlinked temporary file: ``index[image_id]`` -> list.

    One streamed pass writes each kept annotation (``keep(ann)``: the record to store, or None to drop it;
    default: the annotation itself) pickled to a temporary file and records (image id, offset, length) in
    three int64 arrays, sorted by image; a lookup reads that image's records back (``os.pread``, so forked
    DataLoader workers share the file safely). Memory: 24 bytes per kept annotation, whatever its polygons.
    The file lives in ``folder`` (default: the system's temporary folder, $TMPDIR) and disappears with the
    process, even a killed one. Errors raised by ``keep`` (KeyError, TypeError, ValueError) propagate.
    """

    def __init__(
        self,
        path: Path | str,
        what: str,
        keep: Callable[[dict], Any | None] | None = None,
        *,
        folder: Path | str | None = None,
    ) -> None:
        self._file = tempfile.TemporaryFile(dir=folder, buffering=1 << 22)  # noqa: SIM115 (lives with the index)
        images, offsets, lengths = array("q"), array("q"), array("q")
        position = 0
        for ann in stream_items(path, what, "annotations.item"):
            if not isinstance(ann, dict):
                raise PipelineError(f"{what}: {path}: an annotation is not an object")
            record = ann if keep is None else keep(ann)
            if record is None:
                continue
            blob = pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)
            self._file.write(blob)
            images.append(int(ann["image_id"]))
            offsets.append(position)
            lengths.append(len(blob))
            position += len(blob)
        self._file.flush()
        image_ids = np.frombuffer(images, dtype=np.int64)
        order = np.argsort(image_ids, kind="stable")  # file order within an image
        self._image_ids = image_ids[order]
        self._offsets = np.frombuffer(offsets, dtype=np.int64)[order]
        self._lengths = np.frombuffer(lengths, dtype=np.int64)[order]
        self._fd = self._file.fileno()

    def __len__(self) -> int:
        """The number of annotations kept."""
        return len(self._image_ids)

    def count(self, image_id: int) -> int:
        """How many annotations of `image_id` were kept."""
        lo, hi = np.searchsorted(self._image_ids, [image_id, image_id + 1])
        return int(hi - lo)

    def image_ids(self) -> np.ndarray:
        """Sorted ids of the images with at least one kept annotation."""
        return np.unique(self._image_ids)

    def __getitem__(self, image_id: int) -> list:
        lo, hi = np.searchsorted(self._image_ids, [int(image_id), int(image_id) + 1])
        return [pickle.loads(os.pread(self._fd, int(self._lengths[i]), int(self._offsets[i]))) for i in range(lo, hi)]

    def close(self) -> None:
        self._file.close()
