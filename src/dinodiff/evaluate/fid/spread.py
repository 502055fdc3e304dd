"""Share the scoring of a checkpoint between the processes of a distributed run (the training FID hook).

Process p takes the source chunks p, p + P, ... (as `dinodiff generate` does), so every chunk is the same batch
with the same seed as in one process, and the main process gathers the features. The gather runs in a gloo
group of its own with a long timeout: the main process may first spend minutes on the real set's features,
which must not count against the training collectives' timeout (NCCL's is 10 minutes).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch.distributed as dist


class Spread:
    """This process's rank and share; one process when torch.distributed is not initialised (read at each use)."""

    def __init__(self, timeout_s: float = 6 * 3600):
        self.timeout_s = timeout_s
        self._group: dist.ProcessGroup | None = None

    @staticmethod
    def _active() -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    @property
    def rank(self) -> int:
        return dist.get_rank() if self._active() else 0

    @property
    def world(self) -> int:
        return dist.get_world_size() if self._active() else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, count: int) -> list[int]:
        """The indices of `count` chunks this process handles."""
        return list(range(self.rank, count, self.world))

    def gather(self, value: Any) -> list[Any] | None:
        """Every process's `value`, in rank order, on the main process; None on the others."""
        if not self._active():
            return [value]
        if self._group is None:  # every process reaches its first gather together, so they create it together
            self._group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.timeout_s))
        out: list[Any] | None = [None] * self.world if self.is_main else None
        dist.gather_object(value, out, dst=0, group=self._group)
        return out
