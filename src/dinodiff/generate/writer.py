"""PNG encoding and writing off the sampling loop: a small thread pool with a bounded queue.

zlib and PIL's encoder release the GIL, so the threads encode while the main thread runs the next batch on the
accelerator (a 512^2 PNG takes ~10 ms to encode: 0.3 s per batch of 32 that the GPU would otherwise wait for).
At most `max_pending` images wait in the queue, which bounds memory; the first failure is raised on the next
submit or at close. A file that already exists is left alone (a rerun redraws a partly written chunk whole, so
its batch is unchanged, and keeps the images it had).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

import numpy as np

from dinodiff.data.shards import encode_png
from dinodiff.files import write_bytes_atomic


def _write(path: Path, image: np.ndarray) -> None:
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, encode_png(image))


class ImageWriter:
    """`submit(path, uint8 image)` returns at once; `close()` (or leaving the `with` block) waits for every write."""

    def __init__(self, workers: int = 2, max_pending: int = 64):
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="png-writer")
        self._slots = threading.BoundedSemaphore(max(1, max_pending))
        self._futures: list[Future] = []
        self.written = 0

    def submit(self, path: Path, image: np.ndarray) -> None:
        self._raise_failures(done_only=True)
        self._slots.acquire()  # blocks while max_pending images wait: memory stays bounded
        future = self._pool.submit(_write, Path(path), image)
        future.add_done_callback(lambda _: self._slots.release())
        self._futures.append(future)

    def _raise_failures(self, done_only: bool) -> None:
        waiting = []
        for future in self._futures:
            if done_only and not future.done():
                waiting.append(future)
                continue
            future.result()  # re-raises the writer's exception
            self.written += 1
        self._futures = waiting

    def close(self) -> None:
        try:
            self._raise_failures(done_only=False)
        finally:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> "ImageWriter":
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if error is None:
            self.close()
        else:  # the loop failed: finish what was queued, but report the loop's error
            self._pool.shutdown(wait=True)
