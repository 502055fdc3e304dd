"""Dataset adapters: turn a folder, a CSV or a public CXR dataset layout into `Record`s.

Every adapter returns records sorted by `id`. An `id` is derived from the file's path relative
to the dataset's image root, so it is readable, stable across runs and a valid WebDataset key
(letters, digits, `_` and `-` only; no dots).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import logging
import os
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path, PurePosixPath

from dinodiff.data.readers import has_dicom_preamble

log = logging.getLogger(__name__)

KINDS = ("folder", "csv", "mimic-cxr", "montgomery", "shenzhen", "jsrt")
MIMIC_LABELS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion", "Pneumonia", "Pneumothorax",
)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom")
# Extensions stripped from ids. Anything else stays in the id: DICOM files are often named by
# dotted UIDs ("1.2.840.113619.2.55.3"), and dropping their last component would collide.
_STRIP_EXTENSIONS = set(IMAGE_EXTENSIONS) | {".gif", ".bmp", ".img", ".webp", ".jp2", ".txt", ".csv", ".json"}
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_MAX_ID = 120
LABELS_FILE = "labels.csv"  # optional label table at the root of a folder or mask layout
_JSRT_NAME = re.compile(r"^JPC[LN]N\d{3}$", re.IGNORECASE)
_JSRT_EXTENSIONS = {".img", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm"}
SUBJECT_COLUMNS = ("subject", "subject_id", "patient", "patient_id", "patientid", "PatientID")  # CSV auto-detection
_TB_NAME = re.compile(r"^(MCUCXR|CHNCXR)_\d+_([01])$")  # Montgomery/Shenzhen: suffix _1 = tuberculosis


@dataclass
class Record:
    """One input image: where it is, its stable id, and what the dataset says about it."""

    path: Path
    id: str
    dataset: str
    labels: dict[str, float | None] = field(default_factory=dict)  # 1/0/None; MIMIC uncertain = -1.0
    view: str | None = None
    split: str = "train"
    masks: dict[str, Path] = field(default_factory=dict)
    split_fixed: bool = False  # True when the dataset itself defines the split (MIMIC p19, a CSV column)
    subject: str | None = None  # the patient (MIMIC subject, a CSV subject column, a pattern on ids); None: unknown



def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]


def make_id(relpath: str | PurePosixPath) -> str:
    """Readable, unique WebDataset key for a relative path (`a/b c.png` -> `a__b_c-<hash>`).

    Path parts are joined with `__`; a short hash of the full relative path is appended whenever
    sanitising lost information, so distinct paths never share an id.
    """
    rel = PurePosixPath(relpath)
    parts = list(rel.parts)
    if rel.suffix.lower() in _STRIP_EXTENSIONS:
        parts[-1] = rel.stem
    clean = [_UNSAFE.sub("_", p) for p in parts]
    lossy = any(c != p or "__" in p or not p for c, p in zip(clean, parts))
    ident = "__".join(clean)
    if lossy or len(ident) > _MAX_ID:
        ident = f"{ident[:_MAX_ID - 9]}-{_short_hash(rel.as_posix())}"
    return ident


def unique_id(ident: str, relpath: str) -> str:
    """The id of a record whose id `ident` collides with another's: a hash of its path appended."""
    return f"{ident[:_MAX_ID - 9]}-{_short_hash(relpath)}"


def dedupe_ids(records: list[Record], relpaths: list[str]) -> list[Record]:
    """Append a path hash to ids that still collide (e.g. `a.png` and `a.jpg`), then sort."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        groups[r.id].append(i)
    for ident, idx in groups.items():
        if len(idx) > 1:
            for i in idx:
                records[i].id = unique_id(ident, relpaths[i])
    return sorted(records, key=lambda r: r.id)


def _walk_files(root: Path) -> list[Path]:
    """All regular files under root, skipping hidden files and folders (.DS_Store, ._x.png, .git)."""
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath, f) for f in sorted(filenames) if not f.startswith("."))
    return out


def is_image_file(path: Path) -> bool:
    """Image extension, or any other file with the DICOM `DICM` preamble (`IM0001`, `1.2.840.5`)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS or has_dicom_preamble(path)


def _iter_files(root: Path) -> Iterator[tuple[os.DirEntry, str]]:
    """(entry, path relative to root) of the files `_walk_files` lists, in no particular order, one at a time: only
    the folders still to visit are held, not every name (a folder of 100k images)."""
    folders = [(str(root), "")]
    while folders:
        folder, prefix = folders.pop()
        try:
            entries = os.scandir(folder)
        except OSError:  # os.walk skips an unreadable folder too
            continue
        with entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    if not entry.is_symlink():  # as os.walk: a linked folder is neither walked nor a file
                        folders.append((entry.path, f"{prefix}{entry.name}/"))
                else:
                    yield entry, f"{prefix}{entry.name}"


def iter_folder(root: Path, dataset: str | None = None) -> Iterator[tuple[Record, str]]:
    """discover_folder's records and their paths relative to root, one at a time, before their ids are
    de-duplicated and sorted and labels.csv is joined (`prepare` spools them to disk; see data/spool.py)."""
    root = Path(root)
    name = dataset or root.name
    if root.is_file():
        yield Record(path=root.resolve(), id=make_id(root.name), dataset=name), root.name
        return
    real_root = root.resolve()
    for entry, rel in _iter_files(root):
        if rel == LABELS_FILE:
            continue
        # a linked folder is not walked, so only a file itself can be a link: one lstat per file instead of
        # resolve()'s one per path component (a third of prepare's time on 100k small images)
        path = Path(entry.path).resolve() if entry.is_symlink() else real_root / rel
        yield Record(path=path, id=make_id(rel), dataset=name), rel


def discover_folder(root: Path, dataset: str | None = None) -> list[Record]:
    """Every non-hidden file under `root`, recursively.

    Files that are not images (by extension or DICOM preamble) are still returned, so that
    `prepare` reports them as 'not an image' instead of letting them vanish silently.
    """
    found = list(iter_folder(root, dataset))
    if Path(root).is_file():
        return [rec for rec, _ in found]
    return attach_labels(Path(root), dedupe_ids([rec for rec, _ in found], [rel for _, rel in found]))


def _open_text(path: Path):
    return gzip.open(path, "rt", newline="") if path.suffix == ".gz" else open(path, newline="")


def _parse_label(value: str | None) -> float | None:
    if value is None or value.strip() == "":
        return None
    v = value.strip().lower()
    if v in ("true", "yes"):
        return 1.0
    if v in ("false", "no"):
        return 0.0
    return float(v)


def _split_values(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def discover_csv(
    csv_path: Path, path_column: str | None = None, label_columns: list[str] | None = None,
    root: str | Path | None = None, view_column: str | None = None, split_column: str | None = None,
    dataset: str | None = None, subject_column: str | None = None,
) -> list[Record]:
    """Rows of a CSV: a path column (relative to `root`, default the CSV's folder) and labels.

    Without `label_columns`, every column whose values are all in {1, 0, -1, empty, true, false}
    is taken as a label. A named text column (e.g. `finding` = "COVID-19, ARDS") becomes one
    multi-hot label per distinct comma-separated value. `view_column` and `split_column` default
    to `view`/`ViewPosition` and `split`; `subject_column` (the patient) to the first of SUBJECT_COLUMNS present.
    """
    found = list(iter_csv(csv_path, path_column, label_columns, root, view_column, split_column, dataset,
                          subject_column))
    return dedupe_ids([rec for rec, _ in found], [rel for _, rel in found])


class _ColumnKind:
    """What one pass over a column's values tells: is it a label column (every value in {1, 0, -1, empty, true,
    false}, not all empty), and the distinct comma-separated values of a named label column."""

    def __init__(self, categories: bool):
        self.parsed: set[float | None] | None = set()  # None once a value is no label
        self.categories: set[str] | None = set() if categories else None

    def add(self, value: str) -> None:
        if self.parsed is not None:
            try:
                self.parsed.add(_parse_label(value))
            except (ValueError, AttributeError):  # AttributeError: the list of a row's extra fields
                self.parsed = None
            else:
                if not self.parsed - {None} <= {-1.0, 0.0, 1.0}:
                    self.parsed = None
        if self.categories is not None:
            self.categories.update(_split_values(value))

    @property
    def is_label(self) -> bool:
        return self.parsed is not None and self.parsed != {None}


def iter_csv(
    csv_path: Path, path_column: str | None = None, label_columns: list[str] | None = None,
    root: str | Path | None = None, view_column: str | None = None, split_column: str | None = None,
    dataset: str | None = None, subject_column: str | None = None,
) -> Iterator[tuple[Record, str]]:
    """discover_csv's records and their relative paths, one at a time and before their ids are de-duplicated and
    sorted: a first pass over the file finds the columns (errors are raised here, before any record), a second
    yields the rows, so no more than a row is held (`prepare` spools them to disk; see data/spool.py)."""
    csv_path = Path(csv_path)
    with _open_text(csv_path) as f:
        reader = csv.DictReader(f)
        first = next(reader, None)
        if first is None:
            return iter(())
        cols = list(first.keys())
        path_column = path_column or next(
            (c for c in ("path", "filename", "file", "image", "image_path", "Path") if c in cols), None)
        if path_column not in cols:
            raise ValueError(f"{csv_path}: no path column; pass path_column= (columns: {cols})")
        view_column = view_column or next((c for c in ("view", "ViewPosition") if c in cols), None)
        split_column = split_column or ("split" if "split" in cols else None)
        if subject_column is not None and subject_column not in cols:
            raise ValueError(f"{csv_path}: subject column {subject_column!r} not found (columns: {cols})")
        subject_column = subject_column or next((c for c in SUBJECT_COLUMNS if c in cols), None)
        base = Path(root) if root is not None else csv_path.parent
        named = set(label_columns or ())
        kinds = {c: _ColumnKind(categories=c in named) for c in cols}
        rows, exists = 0, False
        for r in chain([first], reader):
            rows += 1
            for c, kind in kinds.items():
                kind.add(r[c])
            exists = exists or (base / r[path_column].strip()).exists()
    if label_columns is None:
        skip = {path_column, view_column, split_column, subject_column}
        label_columns = [c for c in cols if c not in skip and kinds[c].is_label]
    missing = [c for c in label_columns if c not in cols]
    if missing:
        raise ValueError(f"{csv_path}: label columns {missing} not found (columns: {cols})")
    if not exists:
        raise ValueError(f"{csv_path}: none of the {rows} paths in column {path_column!r} exist under "
                         f"{base}; pass root= (the folder they are relative to)")
    binary = [c for c in label_columns if kinds[c].is_label]
    categorical = {c: sorted(kinds[c].categories) for c in label_columns if c not in binary}
    return _csv_records(csv_path, base, path_column, binary, categorical, view_column, split_column, subject_column,
                        dataset or csv_path.parent.name)


def _csv_records(csv_path: Path, base: Path, path_column: str, binary: list[str], categorical: dict[str, list[str]],
                 view_column: str | None, split_column: str | None, subject_column: str | None,
                 dataset: str) -> Iterator[tuple[Record, str]]:
    """iter_csv's second pass: one Record per row."""
    with _open_text(csv_path) as f:
        for row in csv.DictReader(f):
            rel = row[path_column].strip()
            labels = {c: _parse_label(row[c]) for c in binary}
            for c, names in categorical.items():
                present = set(_split_values(row[c]))
                labels.update({n: (float(n in present) if present else None) for n in names})
            yield Record(
                path=(base / rel).resolve(), id=make_id(rel), dataset=dataset, labels=labels,
                view=(row.get(view_column) or None) if view_column else None,
                split=(row[split_column].strip() or "train") if split_column else "train",
                split_fixed=bool(split_column),
                subject=(row[subject_column].strip() or None) if subject_column else None,
            ), rel


def attach_labels(root: Path, records: list[Record]) -> list[Record]:
    """Merge `root/labels.csv` (a path column relative to root + label columns), when present.

    This is how label files that travel with an image layout (e.g. the phantoms' Montgomery-style
    tree) reach the shards. A labels.csv that does not describe these images is ignored with a warning.
    """
    table = {r.path: r for r in label_rows(root)}
    for rec in records:
        join_labels(rec, table.get(rec.path))
    return records


def label_rows(root: Path) -> Iterator[Record]:
    """The rows of `root/labels.csv`, one at a time; none when it is absent or does not describe these images
    (with a warning). A later row for the same path wins."""
    table_path = Path(root) / LABELS_FILE
    if not table_path.is_file():
        return iter(())
    try:
        return (rec for rec, _ in iter_csv(table_path, root=root))
    except ValueError as e:
        log.warning("ignoring %s: %s", table_path, e)
        return iter(())


def join_labels(rec: Record, row: Record | None) -> Record:
    """`rec` with what its row of a labels.csv (None: no row) adds: labels, and a view, subject or split it lacks."""
    if row is not None:
        rec.labels = {**rec.labels, **row.labels}
        rec.view = rec.view or row.view
        rec.subject = rec.subject or row.subject
        if row.split_fixed:
            rec.split, rec.split_fixed = row.split, True
    return rec


def _mimic_csv(root: Path, name: str) -> Path:
    for p in (root / f"{name}.csv.gz", root / f"{name}.csv"):
        if p.exists():
            return p
    raise FileNotFoundError(f"{root}: missing {name}.csv(.gz); is this a MIMIC-CXR-JPG root?")


def discover_mimic(
    root: Path, views: tuple[str, ...] = ("PA", "AP"), test_groups: tuple[str, ...] = ("p19",),
    labels: tuple[str, ...] = MIMIC_LABELS, require_files: bool = True,
) -> list[Record]:
    """MIMIC-CXR-JPG frontal images with CheXpert labels; patient groups in `test_groups` -> test.

    Labels are per study: 1.0, 0.0, -1.0 (uncertain, kept as such) or None (not mentioned).
    With `require_files`, rows whose JPEG is absent (a partial download) are skipped and counted
    in a warning rather than turned into thousands of rejects.
    """
    root = Path(root)
    with _open_text(_mimic_csv(root, "mimic-cxr-2.0.0-chexpert")) as f:
        study_labels = {
            (r["subject_id"], r["study_id"]): {k: _parse_label(r.get(k)) for k in labels} for r in csv.DictReader(f)
        }
    recs, rels, missing = [], [], 0
    with _open_text(_mimic_csv(root, "mimic-cxr-2.0.0-metadata")) as f:
        for r in csv.DictReader(f):
            if r["ViewPosition"] not in views:
                continue
            subj, study = r["subject_id"], r["study_id"]
            rel = f"p{subj[:2]}/p{subj}/s{study}/{r['dicom_id']}.jpg"
            path = root / "files" / rel
            if require_files and not path.exists():
                missing += 1
                continue
            recs.append(Record(
                path=path.resolve(), id=make_id(rel), dataset="mimic-cxr",
                labels=dict(study_labels.get((subj, study), {k: None for k in labels})),
                view=r["ViewPosition"], split="test" if f"p{subj[:2]}" in test_groups else "train",
                split_fixed=True, subject=f"p{subj}",
            ))
            rels.append(rel)
    if missing:
        log.warning("mimic-cxr: %d frontal images listed in the metadata are not on disk; skipped", missing)
    return dedupe_ids(recs, rels)


def images_in(folder: Path) -> list[Path]:
    """The non-hidden files directly in `folder` (not in its subfolders), sorted; [] when it is no folder."""
    return [p for p in _walk_files(folder) if p.parent == folder] if folder.is_dir() else []


def files_by_stem(folder: Path, suffix: str = "") -> dict[str, Path]:
    """Files in `folder` keyed by stem, with `suffix` (e.g. '_mask') removed."""
    out = {}
    for p in images_in(folder):
        stem = p.stem[: -len(suffix)] if suffix and p.stem.endswith(suffix) else p.stem
        out.setdefault(stem, p)
    return out


def _tb_label(stem: str) -> dict[str, float | None]:
    m = _TB_NAME.match(stem)
    return {"Tuberculosis": float(m.group(2))} if m else {}


def _with_masks(root: Path, img_dir: Path, dataset: str, mask_maps: dict[str, dict[str, Path]]) -> list[Record]:
    recs, rels = [], []
    for p in images_in(img_dir):
        rel = p.relative_to(img_dir).as_posix()
        masks = {name: m[p.stem].resolve() for name, m in mask_maps.items() if p.stem in m}
        recs.append(Record(path=p.resolve(), id=make_id(rel), dataset=dataset, labels=_tb_label(p.stem), masks=masks))
        rels.append(rel)
    return attach_labels(root, dedupe_ids(recs, rels))


def discover_montgomery(root: Path) -> list[Record]:
    """Montgomery layout: CXR_png/<stem>.png + ManualMask/leftMask|rightMask/<stem>.png."""
    root = Path(root)
    maps = {"left": files_by_stem(root / "ManualMask" / "leftMask"), "right": files_by_stem(root / "ManualMask" / "rightMask")}
    return _with_masks(root, root / "CXR_png", "montgomery", maps)


def discover_shenzhen(root: Path) -> list[Record]:
    """Shenzhen layout: CXR_png/<stem>.png + masks/<stem>_mask.png (or mask/); mask name 'lungs'."""
    root = Path(root)
    mask_dir = root / "masks" if (root / "masks").is_dir() else root / "mask"
    return _with_masks(root, root / "CXR_png", "shenzhen", {"lungs": files_by_stem(mask_dir, "_mask")})


def _norm_dir(name: str) -> str:
    return re.sub(r"[\s_-]+", "", name.lower())


def discover_jsrt(root: Path) -> list[Record]:
    """JSRT images (JPCLN###/JPCNN###, raw .IMG or converted PNG) with SCR lung masks.

    SCR ships masks as `<fold>/masks/left lung/JPCLN001.gif` and `.../right lung/...` (1024^2,
    half the 2048^2 images; `prepare` resizes masks to the image first). Any folder named
    'left lung'/'left_lung'/'leftlung' (and right) under `root` is searched. Label: Nodule (JPCLN=1).
    """
    root = Path(root)
    images: dict[str, Path] = {}
    masks: dict[str, dict[str, Path]] = {"left": {}, "right": {}}
    for p in _walk_files(root):
        d = _norm_dir(p.parent.name)
        if d in ("leftlung", "rightlung"):
            masks[d[:-4]].setdefault(p.stem.upper(), p.resolve())
        elif _JSRT_NAME.match(p.stem) and p.suffix.lower() in _JSRT_EXTENSIONS:
            # prefer the raw .IMG original over converted copies of the same case
            if p.stem.upper() not in images or p.suffix.lower() == ".img":
                images[p.stem.upper()] = p
    recs = []
    for stem, p in images.items():
        m = {k: v[stem] for k, v in masks.items() if stem in v}
        nodule = {"Nodule": float(stem[3] == "L")}
        recs.append(Record(path=p.resolve(), id=stem, dataset="jsrt", labels=nodule, masks=m))
    return attach_labels(root, sorted(recs, key=lambda r: r.id))


def _has_dir(root: Path, names: set[str], depth: int = 3) -> bool:
    """Whether a folder whose normalised name is in `names` sits within `depth` levels of root."""
    frontier = [root]
    for _ in range(depth):
        nxt = []
        for d in frontier:
            try:
                subs = [e for e in os.scandir(d) if e.is_dir() and not e.name.startswith(".")]
            except OSError:
                continue
            if any(_norm_dir(e.name) in names for e in subs):
                return True
            nxt.extend(Path(e.path) for e in subs)
        frontier = nxt
    return False


def detect_kind(source: str | Path) -> str:
    """Guess the adapter for a source from its layout (falls back to 'folder')."""
    src = Path(source)
    if src.is_file():
        return "csv" if src.name.endswith((".csv", ".csv.gz")) else "folder"
    if any((src / f"mimic-cxr-2.0.0-metadata{e}").exists() for e in (".csv", ".csv.gz")):
        return "mimic-cxr"
    if (src / "CXR_png").is_dir() and (src / "ManualMask").is_dir():
        return "montgomery"
    if (src / "CXR_png").is_dir() and ((src / "masks").is_dir() or (src / "mask").is_dir()):
        return "shenzhen"
    if _has_dir(src, {"all247images", "leftlung"}):
        return "jsrt"
    return "folder"


_ADAPTERS = {
    "folder": discover_folder, "csv": discover_csv, "mimic-cxr": discover_mimic,
    "montgomery": discover_montgomery, "shenzhen": discover_shenzhen, "jsrt": discover_jsrt,
}


def stream_records(source: str | Path, kind: str, **options) -> tuple[Iterator[tuple[Record, str | None]], bool]:
    """discover's records, one at a time where the adapter can (folder, csv: True, with each record's relative path,
    before ids are de-duplicated and sorted and a folder's labels.csv joined); the other adapters' small datasets
    come as discover gives them (False, paths None)."""
    src = Path(source).expanduser()
    if not src.exists():
        raise FileNotFoundError(f"source not found: {src}")
    if kind == "folder":
        return iter_folder(src, **options), True
    if kind == "csv":
        return iter_csv(src, **options), True
    return ((rec, None) for rec in discover(src, kind, **options)), False


def discover(source: str | Path, kind: str = "auto", **options) -> list[Record]:
    """Records of one source, sorted by id. `kind='auto'` detects the layout (see `detect_kind`)."""
    src = Path(source).expanduser()
    if not src.exists():
        raise FileNotFoundError(f"source not found: {src}")
    if kind == "auto":
        kind = detect_kind(src)
    if kind not in _ADAPTERS:
        raise ValueError(f"unknown dataset kind {kind!r}; choose one of {('auto',) + KINDS}")
    return _ADAPTERS[kind](src, **options)
