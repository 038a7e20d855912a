"""llmq.memory.PeakRss: the resident set's peak over a block of work, seen by a sampling thread."""

import sys

import pytest
import torch

from llmq import memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")


def test_peak_rss_sees_a_transient_allocation_that_is_freed_before_the_block_ends():
    size = 256 * 2**20
    with memory.PeakRss(interval=0.005) as peak:
        big = torch.ones(size // 4)  # touched pages: resident
        for _ in range(20):  # stay allocated long enough for several samples
            big.add_(1.0)
        del big
        memory.trim()
    after = memory.rss_bytes()
    assert peak.start is not None and after is not None
    assert peak.bytes >= peak.start + 0.9 * size
    assert peak.bytes >= after + 0.5 * size  # the peak outlives the allocation: it was freed before the block ended
    assert peak.mb == round(peak.bytes / 2**20)


def test_peak_rss_is_none_where_proc_cannot_be_read(monkeypatch, tmp_path):
    monkeypatch.setattr(memory, "_STATUS", tmp_path / "missing")
    with memory.PeakRss() as peak:
        pass
    assert peak.start is None and peak.bytes is None and peak.mb is None
