"""Keep the process's resident memory close to what it actually uses (glibc only; a no-op elsewhere), and measure it.

glibc keeps freed memory in its heaps, so the resident set stays near its high-water mark. For block-by-block
quantization, whose whole point is a small footprint, `trim` hands freed heap pages back after big transient
work (tokenizing a corpus: ~180 MB for LAMBADA with SmolLM2's tokenizer; finishing a block). Pinning glibc's
mmap threshold instead was measured 18% slower on SmolLM2 GPTQ and is not used.

`PeakRss` samples the resident set over a stretch of work (report.json's `quantization.peak_rss_mb`): the process's
high-water mark (ru_maxrss) cannot tell the quantization's peak from an evaluation's before or after it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import threading
from functools import cache
from pathlib import Path
from typing import Self

_STATUS = Path("/proc/self/status")


@cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return lib if lib is not None and hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt") else None


def trim() -> None:
    """Collect garbage and return free heap memory to the OS."""
    gc.collect()
    if _libc() is not None:
        _libc().malloc_trim(0)


def rss_bytes() -> int | None:
    """This process's resident set now (VmRSS), or None where /proc is not there (not Linux)."""
    try:
        text = _STATUS.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None


class PeakRss:
    """`with PeakRss() as peak:` samples the resident set every `interval` seconds on a daemon thread while the
    block runs; `peak.bytes` is the largest sample (None where it cannot be read), `peak.start` the first."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.start, self.bytes = interval, rss_bytes(), None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True, name="llmq-peak-rss")

    def _sample(self) -> None:
        while True:
            now = rss_bytes()
            if now is None:
                return
            self.bytes = max(self.bytes or 0, now)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> Self:
        if self.start is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        now = rss_bytes()  # the block's last moment, in case it ended between two samples
        if now is not None:
            self.bytes = max(self.bytes or 0, now)

    @property
    def mb(self) -> int | None:
        return None if self.bytes is None else round(self.bytes / 2**20)
