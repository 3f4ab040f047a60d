"""Write litdata shards of training images (scripts/make_shards.py is the command line).

The inputs (sorted) are cut into parts of `part_size` images. Each part is one litdata writer
"rank" (chunk-<part>-<n>.bin plus <part>.index.json); when a part is complete, a marker
`.parts/<part>.json` with its counts is written atomically. An interrupted conversion therefore
resumes part by part: parts with a marker are kept, the files of an unfinished part are removed
and written again. When every part is done, litdata merges the part indexes into index.json (the
file ShardDataset needs, so a half-written dataset can never be trained on) and `manifest.json`
records the counts, the skipped inputs with their reasons, and the settings.

Images whose short side is at most `max_side` and whose file is at most `keep_bytes` keep their
original bytes (no re-encoding loss); larger ones are resized to a `max_side` short side and
stored as JPEG at `quality`. An input that does not decode is skipped and listed in the manifest.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

from PIL import Image

from ldm_asym.data.datasets import UnusableImageError, load_image
from ldm_asym.data.shards import INDEX, MANIFEST
from ldm_asym.util import atomic_write

PARTS = ".parts"
_KEEP_FORMATS = ("JPEG", "PNG", "WEBP")


@dataclass(frozen=True)
class Settings:
    max_side: int = 512
    quality: int = 95
    keep_bytes: int = 1 << 20
    part_size: int = 1000
    chunk_bytes: str = "64MB"


def encode(path: str, s: Settings) -> tuple[bytes, bool]:
    """(bytes to store, whether they are the original file's); raises UnusableImageError."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UnusableImageError(f"{type(e).__name__}: {e}") from e
    im = load_image(io.BytesIO(raw), min_side=s.max_side)  # decodes fully: corrupt files fail here
    with Image.open(io.BytesIO(raw)) as probe:
        fmt = probe.format
    if min(im.size) <= s.max_side and len(raw) <= s.keep_bytes and fmt in _KEEP_FORMATS:
        return raw, True
    if min(im.size) > s.max_side:
        r = s.max_side / min(im.size)
        im = im.resize((max(1, round(im.width * r)), max(1, round(im.height * r))), Image.LANCZOS, reducing_gap=3.0)
    out = io.BytesIO()
    im.save(out, "JPEG", quality=s.quality)
    return out.getvalue(), False


def _part_files(out_dir: str, part: int) -> list[str]:
    return glob.glob(os.path.join(out_dir, f"chunk-{part}-*.bin")) + glob.glob(os.path.join(out_dir, f"{part}.index.json"))


def _write_part(out_dir: str, part: int, files: Sequence[str], keys: Sequence[str], s: Settings) -> dict:
    """Write one part (in a worker process); returns its counts and skipped inputs."""
    from litdata.streaming.writer import BinaryWriter

    for leftover in _part_files(out_dir, part):  # an earlier attempt at this part was interrupted
        os.remove(leftover)
    writer, written, kept, skipped = None, 0, 0, []
    for path, key in zip(files, keys):
        try:
            data, original = encode(path, s)
        except UnusableImageError as e:
            skipped.append({"key": key, "reason": str(e)})
            continue
        with _writer_rank(part):
            if writer is None:  # a part whose inputs are all unusable writes no index at all
                writer = BinaryWriter(out_dir, chunk_bytes=s.chunk_bytes)
            writer.add_item(written, {"image": data, "key": key})
        written, kept = written + 1, kept + original
    if writer is not None:
        with _writer_rank(part):
            writer.done()
    record = {"part": part, "inputs": len(files), "written": written, "kept_original_bytes": kept, "skipped": skipped}
    with atomic_write(os.path.join(out_dir, PARTS, f"{part}.json")) as f:
        json.dump(record, f)
    return record


def _plan(out_dir: str, source: str, keys: Sequence[str], s: Settings) -> None:
    """Record what is being converted; a resume with other inputs or settings is refused."""
    plan = {"source": source, "inputs": len(keys), "settings": asdict(s),
            "keys_sha1": hashlib.sha1("\n".join(keys).encode("utf-8", "surrogateescape")).hexdigest()}
    path = os.path.join(out_dir, PARTS, "plan.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        if old != plan:
            diff = [k for k in plan if old.get(k) != plan[k]]
            raise ValueError(f"{out_dir} holds an unfinished conversion with other {', '.join(diff)} "
                             f"({path}): use another --out, or delete it to start over")
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_write(path) as f:
        json.dump(plan, f)


def write_shards(files: Sequence[str], keys: Sequence[str], out_dir: str, source: str, s: Settings = Settings(),
                 workers: int = 1, progress: Callable[[int], None] | None = None) -> dict:
    """Convert `files` (stored under the names `keys`) into litdata shards in `out_dir`; returns the
    manifest. Resumable: run it again with the same arguments after an interruption."""
    out_dir = os.path.abspath(out_dir)
    manifest_path = os.path.join(out_dir, MANIFEST)
    if os.path.isfile(os.path.join(out_dir, INDEX)) and os.path.isfile(manifest_path):
        with open(manifest_path, encoding="utf-8") as f:
            return json.load(f)  # already complete
    if os.path.isfile(os.path.join(out_dir, INDEX)):
        raise ValueError(f"{out_dir} already holds a litdata dataset ({INDEX}) that this tool did not finish: "
                         f"use another --out")
    if not files:
        raise ValueError(f"no input images in {source}")
    _plan(out_dir, source, keys, s)
    parts = [(p, files[i:i + s.part_size], keys[i:i + s.part_size])
             for p, i in enumerate(range(0, len(files), s.part_size))]
    records = {}
    for p, _, _ in parts:
        marker = os.path.join(out_dir, PARTS, f"{p}.json")
        if os.path.isfile(marker):
            with open(marker, encoding="utf-8") as f:
                records[p] = json.load(f)
            if progress:
                progress(records[p]["inputs"])
    todo = [part for part in parts if part[0] not in records]
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(workers) as pool:
            futures = [pool.submit(_write_part, out_dir, p, f, k, s) for p, f, k in todo]
            for fut in futures:
                rec = fut.result()
                records[rec["part"]] = rec
                if progress:
                    progress(rec["inputs"])
    else:
        for p, f, k in todo:
            records[p] = _write_part(out_dir, p, f, k, s)
            if progress:
                progress(records[p]["inputs"])
    written = sum(r["written"] for r in records.values())
    if written == 0:
        raise ValueError(f"none of the {len(files)} inputs in {source} could be read; nothing written")
    _merge(out_dir)
    manifest = {
        "format": "ldm_asym shards v1 (litdata; item = {'image': encoded bytes, 'key': str})",
        "source": source, "inputs": len(files), "written": written,
        "kept_original_bytes": sum(r["kept_original_bytes"] for r in records.values()),
        "skipped": [s_ for p in sorted(records) for s_ in records[p]["skipped"]],
        "parts": len(parts), "settings": asdict(s),
    }
    with atomic_write(manifest_path) as f:
        json.dump(manifest, f, indent=1)
    return manifest


def _merge(out_dir: str) -> None:
    """litdata's merge of the part indexes into index.json, in part order (it sorts them naturally).
    Its public `merge()` waits for world_size x workers indexes and sees world size 0 outside a
    distributed job; every part is known to be complete here, so merge without waiting."""
    from litdata.streaming.writer import BinaryWriter

    with _writer_rank(0):
        BinaryWriter(out_dir, chunk_bytes="64MB")._merge_no_wait()


@contextlib.contextmanager
def _writer_rank(rank: int):
    """litdata names a writer's files (chunk-<rank>-<n>.bin, <rank>.index.json) by this variable."""
    old = os.environ.get("DATA_OPTIMIZER_GLOBAL_RANK")
    os.environ["DATA_OPTIMIZER_GLOBAL_RANK"] = str(rank)
    try:
        yield
    finally:
        if old is None:
            del os.environ["DATA_OPTIMIZER_GLOBAL_RANK"]
        else:
            os.environ["DATA_OPTIMIZER_GLOBAL_RANK"] = old
