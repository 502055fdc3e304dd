"""Discovery's records spooled to an on-disk table, so that `prepare` holds none of them all at once.

`prepare` sorts every record by id, renames colliding ids, joins a folder's labels.csv and cuts the sorted records
into shards; in memory that took ~1.8 KB per image (180 MB at 100k images). Here the records go into a sqlite3
table (the standard library's) as they are found, and each step is a query: a collision is a GROUP BY on the id,
the label join a lookup by path, and the shards' records are read back one chunk at a time in (split, id) order.
Memory stays bounded over any number of images; the records, renamings and order are those of the in-memory
adapters (`datasets.discover`, `datasets.dedupe_ids`), so the shards are byte for byte the same.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from dinodiff.data.datasets import Record, join_labels, unique_id
from dinodiff.data.subjects import pattern_mismatch, subject_in

logger = logging.getLogger(__name__)

BATCH = 10_000  # rows read or written per round trip


def _encode(rec: Record) -> str:
    """A record's fields but its id and subject (columns of their own: they change), as JSON."""
    return json.dumps({"path": str(rec.path), "dataset": rec.dataset, "labels": rec.labels, "view": rec.view,
                       "split": rec.split, "masks": {k: str(v) for k, v in rec.masks.items()},
                       "split_fixed": rec.split_fixed})


def _decode(ident: str, subject: str | None, data: str) -> Record:
    d = json.loads(data)
    return Record(path=Path(d["path"]), id=ident, dataset=d["dataset"], labels=d["labels"], view=d["view"],
                  split=d["split"], masks={k: Path(v) for k, v in d["masks"].items()}, split_fixed=d["split_fixed"],
                  subject=subject)


class RecordSpool:
    """Records in a sqlite3 file: added source by source, renamed and split by queries, read back in shard order.

    `seq` is the order records were added in; `rel` the path a collision is resolved with; `split` the shard's
    split once assigned (the record's own split stays in `data`); `ordered` their final order (split, id).
    """

    def __init__(self, path: Path):
        # one connection, read by the worker pool's feeder thread too: queries hold the lock
        self.db = sqlite3.connect(path, check_same_thread=False)
        self.lock = threading.Lock()
        self.db.execute("PRAGMA journal_mode=OFF")  # a scratch file: nothing to recover after a crash
        self.db.execute("PRAGMA synchronous=OFF")
        self.db.execute("CREATE TABLE records (seq INTEGER PRIMARY KEY, source INTEGER, id TEXT, path TEXT, "
                        "rel TEXT, subject TEXT, skip INTEGER, split TEXT, data TEXT)")
        self.db.execute("CREATE TABLE labels (path TEXT PRIMARY KEY, subject TEXT, data TEXT)")
        self.db.execute("CREATE TABLE ordered (pos INTEGER PRIMARY KEY, seq INTEGER)")
        self.db.create_function("unique_id", 2, unique_id, deterministic=True)

    def close(self) -> None:
        self.db.close()

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM records").fetchone()[0]

    # ------------------------------------------------------------------------------------------------ adding
    def add_labels(self, rows: Iterable[Record]) -> None:
        """A label table's rows (a folder's labels.csv), keyed by path; a later row for a path replaces it."""
        self.db.executemany("INSERT OR REPLACE INTO labels VALUES (?, ?, ?)",
                            ((str(r.path), r.subject, _encode(r)) for r in rows))

    def label_of(self, path: Path) -> Record | None:
        row = self.db.execute("SELECT subject, data FROM labels WHERE path = ?", (str(path),)).fetchone()
        return None if row is None else _decode("", *row)

    def add(self, records: Iterable[tuple[Record, str | None]], source: int, skip: Callable[[Record], bool],
            labelled: bool = False) -> None:
        """Records of one source (with the path a collision of their ids is resolved with). `skip`: records
        dropped after the source's ids are de-duplicated (prepare's own output); `labelled`: each is joined with
        its row of the label table (add_labels) by path, as datasets.attach_labels does."""
        def row(rec: Record, rel: str | None) -> tuple:
            if labelled:
                join_labels(rec, self.label_of(rec.path))
            return source, rec.id, str(rec.path), rel, rec.subject, skip(rec), _encode(rec)

        self.db.executemany("INSERT INTO records (source, id, path, rel, subject, skip, data) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?)", (row(rec, rel) for rec, rel in records))
        self.db.execute("DELETE FROM labels")

    def drop_skipped(self) -> None:
        self.db.execute("DELETE FROM records WHERE skip")

    def dedupe(self, source: int | None = None) -> None:
        """datasets.dedupe_ids on one source's records (`rel`: their relative paths), or on every record
        (source None: their full paths)."""
        key, where = ("rel", "source = :source") if source is not None else ("path", "1")
        self.db.execute("CREATE INDEX IF NOT EXISTS by_source_id ON records (source, id)")
        self.db.execute(
            f"UPDATE records SET id = unique_id(id, {key}) WHERE {where} AND id IN "
            f"(SELECT id FROM records WHERE {where} GROUP BY id HAVING COUNT(*) > 1)", {"source": source})

    def prefix(self, source: int, prefix: str) -> None:
        """Ids of one source prefixed `prefix__` (ids from several sources may clash)."""
        self.db.execute("UPDATE records SET id = ? || '__' || id WHERE source = ?", (prefix, source))

    # --------------------------------------------------------------------------------------- rows, one pass
    def _rewrite(self, column: str, value: Callable[[Record], str | None], order: str) -> None:
        """Set `column` of every record to value(record), visiting them in `order` (a read cursor and batched
        writes of another column: the scan is not disturbed)."""
        read = self.db.cursor().execute(f"SELECT seq, id, subject, data FROM records ORDER BY {order}")
        while batch := read.fetchmany(BATCH):
            self.db.executemany(f"UPDATE records SET {column} = ? WHERE seq = ?",
                                [(value(_decode(ident, subject, data)), seq) for seq, ident, subject, data in batch])

    def apply_subject_pattern(self, pattern: str) -> None:
        """subjects.apply_subject_pattern over the records in the order `prepare` held them (source by source,
        each sorted by id): every id must match."""
        regex, count, named = re.compile(pattern), {"ids": 0, "misses": 0}, []

        def subject(rec: Record) -> str | None:
            count["ids"] += 1
            found = subject_in(regex, rec.id)
            if found is None:
                count["misses"] += 1
                named.extend([rec.id][:4 - len(named)])  # the first few are named
            return found if found is not None else rec.subject

        self._rewrite("subject", subject, "source, id, seq")
        if count["misses"]:
            raise pattern_mismatch(pattern, count["ids"], named, count["misses"])

    def assign_splits(self, split_of: Callable[[Record], str]) -> None:
        """Each record's shard split, then the final order: by split, then id (ties: the order added)."""
        self._rewrite("split", split_of, "seq")
        self.db.execute("DELETE FROM ordered")
        self.db.execute("INSERT INTO ordered (seq) SELECT seq FROM records ORDER BY split, id, source, seq")

    # ------------------------------------------------------------------------------------------- reading
    def chunks(self, shard_size: int) -> list[tuple[str, int, int, int]]:
        """(split, index in its split, first position, records) of each shard's chunk of `shard_size` records."""
        out, first = [], 1
        for split, n in self.db.execute("SELECT split, COUNT(*) FROM records GROUP BY split ORDER BY split"):
            out += [(split, i // shard_size, first + i, min(shard_size, n - i)) for i in range(0, n, shard_size)]
            first += n
        return out

    def records(self, first: int, count: int) -> list[Record]:
        """`count` records from position `first` of the final order, as Records with their shard split."""
        with self.lock:
            rows = self.db.execute(
                "SELECT r.id, r.subject, r.split, r.data FROM ordered o JOIN records r ON r.seq = o.seq "
                "WHERE o.pos >= ? AND o.pos < ? ORDER BY o.pos", (first, first + count)).fetchall()
        out = []
        for ident, subject, split, data in rows:
            rec = _decode(ident, subject, data)
            rec.split = split
            out.append(rec)
        return out

    def subjects(self) -> dict[str, int]:
        """How many records name a subject, and how many distinct subjects they name."""
        n, distinct = self.db.execute("SELECT COUNT(*), COUNT(DISTINCT subject) FROM records "
                                      "WHERE subject IS NOT NULL AND subject != ''").fetchone()
        return {"images_with_subject": n, "distinct": distinct}
