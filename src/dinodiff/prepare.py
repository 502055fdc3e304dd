"""The `prepare` stage: raw images -> WebDataset shards + manifest.json + rejects.csv.

Records are sorted by id, split, and cut into fixed chunks of `shard_size` *input* records, one
shard per chunk, so shard boundaries never depend on which files turn out unreadable. The records are spooled to
an on-disk table as they are found (data/spool.py), so memory stays flat over any number of images. Each shard
is written atomically with a sidecar (`<shard>.meta.json`: fingerprint, rejects, statistics, and the
shard's size and sha256); a rerun skips every chunk whose sidecar fingerprint still matches and whose
shard still has that size and hash, redoes the others (a shard cut short or damaged is logged and
rewritten), and reproduces the same bytes.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import threading
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

import dinodiff
from dinodiff.config import PrepareSettings
from dinodiff.data.datasets import Record, detect_kind, label_rows, stream_records
from dinodiff.data.fingerprints import ExcludedImages, excluded_images
from dinodiff.data.preprocess import preprocess_image, preprocess_mask
from dinodiff.data.readers import TO_UINT8_RULES, UnreadableImage, load_image, load_mask
from dinodiff.data.shards import (
    SHARD_DIR,
    encode_json,
    encode_png,
    file_digest,
    list_shards,
    read_samples,
    shard_path,
    sidecar_path,
    write_shard,
)
from dinodiff.data.spool import RecordSpool
from dinodiff.data.subjects import hash_split, subject_key
from dinodiff.files import write_bytes_atomic
from dinodiff.memory import fix_mmap_threshold

logger = logging.getLogger(__name__)
FORMAT_VERSION = 1
PERCENTILES = (0.5, 1, 5, 25, 50, 75, 95, 99, 99.5)
_OURS = re.compile(r"^[A-Za-z0-9_-]+-\d{6}\.(tar|meta\.json)$")


class NothingUsable(Exception):
    """No input could be used; the message says what was found and why it was rejected."""


@dataclass(frozen=True)
class _Settings:
    size: int
    min_size: int
    remove_borders: bool
    intensity: str
    excluded_key: str = ""  # ExcludedImages.key: a shard is redone when the images to exclude change


_SETTINGS: _Settings | None = None  # set in each worker by _init_worker
_EXCLUDED: ExcludedImages | None = None


def _init_worker(settings: _Settings, excluded: ExcludedImages | None = None) -> None:
    global _SETTINGS, _EXCLUDED
    _SETTINGS, _EXCLUDED = settings, excluded


def process_record(rec: Record) -> tuple:
    """One record -> ('ok', sample dict, 256-bin histogram) or ('reject', reason, detail)."""
    s = _SETTINGS
    if _EXCLUDED is not None and (why := _EXCLUDED.match(rec.path)) is not None:
        return ("reject", "excluded", why)
    try:
        img, meta = load_image(rec.path, s.intensity)
        out, info = preprocess_image(img, s.size, s.remove_borders, s.min_size)
    except UnreadableImage as e:
        return ("reject", e.reason, "")
    except Exception as e:  # an unexpected failure on one file must not stop the run
        return ("reject", f"error: {type(e).__name__}", str(e)[:300])
    if _EXCLUDED is not None and (why := _EXCLUDED.match(None, out)) is not None:
        return ("reject", "excluded", why)
    sample: dict = {"__key__": rec.id, "png": encode_png(out)}
    mask_errors = {}
    for name, mpath in sorted(rec.masks.items()):
        try:
            sample[f"mask_{name}.png"] = encode_png(preprocess_mask(load_mask(mpath, info.original_size), info))
        except Exception as e:  # a bad mask costs the mask, not the image
            mask_errors[name] = getattr(e, "reason", None) or f"{type(e).__name__}: {e}"[:200]
    sample["json"] = {
        "id": rec.id, "path": str(rec.path), "dataset": rec.dataset, "split": rec.split, "subject": rec.subject,
        "view": rec.view or meta.get("view"), "labels": rec.labels,
        "masks": sorted(k[5:-4] for k in sample if k.startswith("mask_")),
        "format": meta.get("format"), "bit_depth": meta.get("bit_depth"), **info.to_json(),
        **({"mask_errors": mask_errors} if mask_errors else {}),
    }
    return ("ok", sample, np.bincount(out.ravel(), minlength=256))


def _split_of(rec: Record, test_fraction: float, seed: int, val_fraction: float = 0.0) -> str:
    """The dataset's own split, else a hash of the subject (the image when unknown): a patient never straddles.

    A dataset's own test split is kept; `val_fraction` then carves the validation split from its training side.
    """
    if rec.split_fixed and (rec.split != "train" or val_fraction <= 0):
        return rec.split
    if test_fraction <= 0 and val_fraction <= 0:
        return rec.split
    test = 0.0 if rec.split_fixed else test_fraction
    return hash_split(subject_key(rec.id, rec.subject), test, seed, val_fraction)


def _collect(sources: list[Path], kind: str, out: Path, spool: RecordSpool, subject_column: str | None = None,
             subject_pattern: str | None = None) -> dict[str, str]:
    """Every source's records into `spool`, ids unique (prefixed by their source's name when there are several);
    returns each source's kind."""
    kinds = {}
    for number, src in enumerate(sources):
        kinds[str(src)] = detect_kind(src) if kind == "auto" else kind
        options = {"subject_column": subject_column} if subject_column and kinds[str(src)] == "csv" else {}
        records, streamed = stream_records(src, kinds[str(src)], **options)
        labelled = streamed and kinds[str(src)] == "folder" and src.is_dir()
        if labelled:
            spool.add_labels(label_rows(src))  # joined by path as the records are added
        # an output folder inside a source must not feed its own shards back in on a rerun
        spool.add(records, number, skip=lambda r: out in r.path.parents, labelled=labelled)
        if streamed:  # the adapter's own de-duplication (the other adapters did it)
            spool.dedupe(number)
        spool.drop_skipped()
        if len(sources) > 1:  # ids from different sources may clash: prefix the source's name
            spool.prefix(number, re.sub(r"[^A-Za-z0-9_-]+", "_", src.stem))
        # Subjects are not prefixed: the same patient named in two sources stays one patient (two sources that
        # number their patients alike are merged, which only makes a split more conservative).
    if subject_pattern:
        spool.apply_subject_pattern(subject_pattern)
    spool.dedupe()
    return kinds


def _fingerprint(chunk: list[Record], settings: _Settings) -> str:
    """Hash of everything a shard's bytes depend on, including each input file's size and mtime."""
    values = {k: v for k, v in asdict(settings).items() if k != "excluded_key" or v}  # none: as before exclusion
    h = hashlib.sha256(encode_json({"format": FORMAT_VERSION, **values}))
    for r in chunk:
        try:
            st = os.stat(r.path)
            stat = [st.st_size, st.st_mtime_ns]
        except OSError:
            stat = None
        masks = {k: str(v) for k, v in r.masks.items()}
        h.update(encode_json({"r": [r.id, str(r.path), r.dataset, r.labels, r.view, r.split, masks, stat, r.subject]}))
    return h.hexdigest()


_sidecar = sidecar_path


def _done(tar: Path, fingerprint: str) -> dict | None:
    """The sidecar of a finished chunk whose inputs are unchanged and whose shard is intact, else None."""
    try:
        meta = json.loads(_sidecar(tar).read_text())
    except (OSError, ValueError):
        return None
    if meta.get("fingerprint") != fingerprint:
        return None
    if meta["samples"] == 0:
        return meta
    problem = _damage(tar, meta)
    if problem is not None:
        logger.warning("shard %s is damaged (%s): redoing its chunk", tar, problem)
        return None
    return meta


def _damage(tar: Path, meta: dict) -> str | None:
    """Why the shard differs from what its sidecar recorded; None when its size and sha256 match."""
    if not tar.is_file():
        return "file missing"
    if "sha256" not in meta:
        return "its sidecar records no size/sha256 (written by an older dinodiff)"
    size, digest = file_digest(tar)
    if size != meta.get("bytes"):
        return f"{size} bytes, expected {meta.get('bytes')}"
    return None if digest == meta["sha256"] else "sha256 differs from the sidecar's"


def _finish_chunk(tar: Path, split: str, fp: str, chunk: list[Record], results: list[tuple]) -> dict:
    samples = [r[1] for r in results if r[0] == "ok"]
    hist = sum((r[2] for r in results if r[0] == "ok"), np.zeros(256, np.int64))
    labels: dict[str, Counter] = {}
    for s in samples:
        for k, v in s["json"]["labels"].items():
            key = {1.0: "positive", 0.0: "negative", -1.0: "uncertain"}.get(v, "unknown")
            labels.setdefault(k, Counter())[key] += 1
    meta = {
        "fingerprint": fp, "shard": tar.name, "split": split, "inputs": len(chunk), "samples": len(samples),
        "rejects": [[str(rec.path), r[1], r[2]] for rec, r in zip(chunk, results) if r[0] == "reject"],
        "histogram": hist.tolist(), "labels": {k: dict(sorted(c.items())) for k, c in sorted(labels.items())},
        "masks": dict(sorted(Counter(m for s in samples for m in s["json"]["masks"]).items())),
        "views": dict(sorted(Counter(s["json"]["view"] or "unknown" for s in samples).items())),
        "datasets": dict(sorted(Counter(s["json"]["dataset"] for s in samples).items())),
    }
    if samples:
        write_shard(tar, samples)
        meta["bytes"], meta["sha256"] = file_digest(tar)
    elif tar.exists():
        tar.unlink()
    write_bytes_atomic(_sidecar(tar), encode_json(meta))
    return meta


def _intensity(hist: np.ndarray) -> dict:
    n = int(hist.sum())
    if n == 0:
        return {}
    levels = np.arange(256)
    mean = float((hist * levels).sum() / n)
    std = float(np.sqrt((hist * (levels - mean) ** 2).sum() / n))
    cdf = np.cumsum(hist) / n
    pct = {str(p): int(np.searchsorted(cdf, p / 100.0)) for p in PERCENTILES}
    return {"mean": round(mean, 4), "std": round(std, 4), "percentiles": pct, "histogram": hist.tolist()}


def _merge(metas: list[dict], key: str) -> dict:
    total: dict[str, Counter] = {}
    for m in metas:
        for name, c in m[key].items():
            total.setdefault(name, Counter()).update(c)
    return {k: dict(sorted(c.items())) for k, c in sorted(total.items())}


def _total(metas: list[dict], key: str) -> dict[str, int]:
    total: Counter = Counter()
    for m in metas:
        total.update(m[key])
    return dict(sorted(total.items()))


def _manifest(metas: list[dict], params: dict) -> dict:
    reasons = Counter(r[1] for m in metas for r in m["rejects"])
    written = sum(m["samples"] for m in metas)
    splits: dict[str, Counter] = {}
    for m in metas:
        c = splits.setdefault(m["split"], Counter())
        c.update(found=m["inputs"], written=m["samples"], rejected=len(m["rejects"]), shards=int(m["samples"] > 0))
    labels = _merge(metas, "labels")
    for c in labels.values():
        c["prevalence"] = round(c.get("positive", 0) / written, 6) if written else 0.0
    hist = np.sum([m["histogram"] for m in metas], axis=0) if metas else np.zeros(256)
    return {
        "dinodiff_version": dinodiff.__version__, "format": FORMAT_VERSION, "size": params["size"],
        "parameters": params,
        "counts": {"found": sum(m["inputs"] for m in metas), "written": written,
                   "rejected": sum(reasons.values()), "reject_reasons": dict(reasons.most_common())},
        "splits": {k: dict(v) for k, v in sorted(splits.items())},
        "shards": [{"path": f"{SHARD_DIR}/{m['shard']}", "split": m["split"], "samples": m["samples"]}
                   for m in metas if m["samples"]],
        "datasets": _total(metas, "datasets"), "views": _total(metas, "views"), "masks": _total(metas, "masks"),
        "labels": labels, "intensity": _intensity(np.asarray(hist, np.int64)),
    }


def _write_rejects(path: Path, metas: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "reason", "detail"])
    for m in metas:
        w.writerows(m["rejects"])
    write_bytes_atomic(path, buf.getvalue().encode("utf-8"))


class _Window:
    """At most `size` records in flight between the pool's feeder and the consumer: memory stays bounded.

    `Pool.imap` otherwise submits every record at once and queues every result (a 512^2 PNG each) that the
    consumer, writing shards, has not taken yet.
    """

    def __init__(self, size: int):
        self.slots, self.stopped = threading.Semaphore(size), False

    def feed(self, records: Iterable[Record]) -> Iterator[Record]:
        for rec in records:
            self.slots.acquire()
            if self.stopped:
                return
            yield rec

    def taken(self) -> None:
        self.slots.release()

    def stop(self) -> None:
        self.stopped = True
        self.slots.release()  # wakes the feeder thread if it waits, so the pool can shut down


def _results(todo: list[tuple], spool: RecordSpool, settings: _Settings, excluded: ExcludedImages | None,
             workers: int, bar: tqdm):
    """Yield (todo item, its records, their results) for each chunk in `todo`, processing records on `workers`
    processes; a chunk's records are read from the spool once, when fed, and held until written (the feeder runs
    at most 64 records per worker ahead, so never all of them)."""
    fed: deque[list[Record]] = deque()  # chunks read and fed, not yet written (appended by the feeder thread)

    def read_and_feed() -> Iterator[Record]:
        for *_, first, count in todo:
            chunk = spool.records(first, count)
            fed.append(chunk)
            yield from chunk

    recs = read_and_feed()
    window = _Window(64 * workers)
    if workers <= 1:
        _init_worker(settings, excluded)
        stream = map(process_record, recs)
        pool = None
    else:
        pool = mp.get_context().Pool(workers, initializer=_init_worker, initargs=(settings, excluded))
        # ordered imap over records (not chunks): parallel even when there is a single shard
        stream = pool.imap(process_record, window.feed(recs), chunksize=4)
    try:
        for item in todo:
            results = []
            for _ in range(item[4]):
                results.append(next(stream))
                window.taken()
                bar.update(1)
            yield item, fed.popleft(), results  # its records were all fed: the feeder appended it already
    finally:
        if pool is not None:
            window.stop()
            pool.terminate()
            pool.join()


def prepare(sources: list[str | Path], out: str | Path, settings: PrepareSettings | None = None, *,
            progress: bool = True, **changes: Any) -> dict:
    """Preprocess every image of `sources` into shards under `out`; returns the manifest.

    Subjects (patients) come from the dataset (MIMIC-CXR, a CSV subject column) or `subject_pattern` (a regex
    on ids; group 1 is the subject; it must match every id); they are stored in each sample's metadata, and
    the `test_fraction` split hashes them, so a patient's images are all on one side. `val_fraction` puts
    another share of subjects in a `val` split: what checkpoint selection (`dinodiff sweep`) tunes on, so that
    the test split stays unseen by every choice. `settings` (default PrepareSettings()) with `changes` to its
    fields, e.g. ``prepare([src], out, size=128, test_fraction=0.2)``.

    Bad inputs never stop the run: they are listed in `out/rejects.csv` with a reason. Raises
    `NothingUsable` when no input at all could be used (rejects.csv is still written).
    """
    p = dataclasses.replace(settings or PrepareSettings(), **changes)
    kind, size, min_size, remove_borders, intensity = p.kind, p.size, p.min_size, p.remove_borders, p.intensity
    shard_size, workers, seed, test_fraction, val_fraction = p.shard_size, p.workers, p.seed, p.test_fraction, \
        p.val_fraction
    fix_mmap_threshold()  # image-sized buffers in mmap: memory stays flat over any number of images
    if isinstance(sources, (str, Path)):
        sources = [sources]
    sources = [Path(s).expanduser().resolve() for s in sources]
    out = Path(out).expanduser().resolve()
    if intensity not in TO_UINT8_RULES:
        raise ValueError(f"intensity={intensity!r}: use one of {TO_UINT8_RULES}")
    if shard_size < 1 or size < 8 or not 0.0 <= test_fraction < 1.0 or not 0.0 <= val_fraction < 1 - test_fraction:
        raise ValueError(f"need shard_size >= 1, size >= 8, 0 <= test_fraction < 1 and 0 <= val_fraction < "
                         f"1 - test_fraction (got {shard_size}, {size}, {test_fraction}, {val_fraction})")
    exclude = [Path(e).expanduser().resolve() for e in p.exclude or ()]
    missing = [str(e) for e in exclude if not e.exists()]
    if missing:
        raise FileNotFoundError(f"exclude: {', '.join(missing)} not found; give the image sets to keep out "
                                "(folders, datasets or prepared folders)")
    excluded = excluded_images(exclude) if exclude else None
    settings = _Settings(int(size), int(min_size), bool(remove_borders), intensity, excluded.key if excluded else "")
    params = {"sources": [str(s) for s in sources], "kind": kind, "size": settings.size,
              "min_size": settings.min_size, "remove_borders": settings.remove_borders, "intensity": intensity,
              "shard_size": int(shard_size), "seed": int(seed), "test_fraction": float(test_fraction),
              "val_fraction": float(val_fraction), "subject_column": p.subject_column,
              "subject_pattern": p.subject_pattern,
              "exclude": [str(e) for e in exclude]}
    scratch = out / ".records.tmp"  # the discovered records, on disk (a killed run's is replaced)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        with closing(RecordSpool(scratch / "records.sqlite")) as spool:
            params["kinds"] = _collect(sources, kind, out, spool, p.subject_column, p.subject_pattern)
            if not len(spool):
                raise NothingUsable(f"no files found in {', '.join(map(str, sources))}")
            spool.assign_splits(lambda r: _split_of(r, test_fraction, seed, val_fraction))
            plan, metas, todo = _plan(out, spool, shard_size, settings)
            n_workers = max(1, min(workers or len(os.sched_getaffinity(0)), sum(t[4] for t in todo) or 1))
            with tqdm(total=sum(t[4] for t in todo), unit="img", desc="prepare", disable=not progress) as bar:
                for (tar, split, fp, _, _), chunk, results in _results(todo, spool, settings, excluded, n_workers, bar):
                    metas[tar] = _finish_chunk(tar, split, fp, chunk, results)
            params["subjects"] = spool.subjects()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _remove_unplanned(out / SHARD_DIR, plan)
    manifest = _write_outputs(out, [metas[p] for p in plan], params)
    counts = manifest["counts"]
    if counts["written"] == 0:
        why = ", ".join(f"{n} {r!r}" for r, n in counts["reject_reasons"].items())
        raise NothingUsable(f"nothing usable in {', '.join(map(str, sources))}: {counts['found']} "
                            f"file{'s' if counts['found'] != 1 else ''}, "
                            f"all rejected: {why}. See {out / 'rejects.csv'}")
    return manifest


def _plan(out: Path, spool: RecordSpool, shard_size: int,
          settings: _Settings) -> tuple[list[Path], dict[Path, dict], list[tuple]]:
    """Every shard's path, the sidecars of those already done, and (tar, split, fingerprint, first, count) to do:
    the records, in split then id order, cut into chunks of `shard_size` per split (read back from the spool by
    position when processed)."""
    shards = out / SHARD_DIR
    shards.mkdir(parents=True, exist_ok=True)
    for p in shards.glob(".*.tmp"):  # leftovers of an interrupted run
        p.unlink(missing_ok=True)
    plan, metas, todo = [], {}, []
    for split, idx, first, count in spool.chunks(shard_size):
        tar, fp = shard_path(out, split, idx), _fingerprint(spool.records(first, count), settings)
        plan.append(tar)
        if (meta := _done(tar, fp)) is not None:
            metas[tar] = meta
        else:
            todo.append((tar, split, fp, first, count))
    return plan, metas, todo


def _remove_unplanned(shards: Path, plan: list[Path]) -> None:
    """Delete our shards and sidecars that this run did not plan: an earlier, larger input set would pollute
    list_shards."""
    keep = {p.name for p in plan} | {_sidecar(p).name for p in plan}
    for p in shards.iterdir():
        if _OURS.match(p.name) and p.name not in keep:
            p.unlink()


def _write_outputs(out: Path, metas: list[dict], params: dict) -> dict:
    """manifest.json, rejects.csv and (when anything was written) preview.png; returns the manifest."""
    manifest = _manifest(metas, params)
    _write_rejects(out / "rejects.csv", metas)
    write_bytes_atomic(out / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True).encode() + b"\n")
    if manifest["counts"]["written"]:
        write_preview(out)
    return manifest


def write_preview(out: str | Path, count: int = 64, columns: int = 8, tile: int = 128) -> Path:
    """`out/preview.png`: the first `count` prepared images as a contact sheet, for a person to check."""
    out = Path(out)
    tiles = []
    for sample in read_samples(list_shards(out)):
        tiles.append(Image.fromarray(sample["image"]).resize((tile, tile), Image.Resampling.BILINEAR))
        if len(tiles) == count:
            break
    rows = -(-len(tiles) // columns)
    sheet = Image.new("L", (columns * (tile + 2), rows * (tile + 2)), 255)
    for i, thumb in enumerate(tiles):
        sheet.paste(thumb, ((i % columns) * (tile + 2), (i // columns) * (tile + 2)))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    write_bytes_atomic(out / "preview.png", buffer.getvalue())
    return out / "preview.png"
