"""Long stages fix glibc's mmap threshold so batch-sized buffers do not fragment the heap (dinodiff.memory)."""

from __future__ import annotations

import ctypes
import sys

import pytest

from dinodiff import memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_mmap_threshold_is_fixed_once(monkeypatch):
    calls = []
    real = ctypes.CDLL

    class Libc:
        def __init__(self, name):
            self.lib = real(name)

        def mallopt(self, param, value):
            calls.append((param, value))
            return self.lib.mallopt(param, value)

    monkeypatch.setattr(memory, "_done", False)
    monkeypatch.setattr(memory.ctypes, "CDLL", Libc)
    assert memory.fix_mmap_threshold() is True
    assert memory.fix_mmap_threshold() is True  # already done: no second call
    assert calls == [(memory.M_MMAP_THRESHOLD, memory.MMAP_THRESHOLD)]
