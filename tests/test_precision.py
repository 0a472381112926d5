"""Precision choices against the hardware itself, not a monkeypatch of the detection."""

from pathlib import Path

import pytest
import torch

from mvit.runtime import precision

CPUINFO = Path("/proc/cpuinfo")


def cpu_flags() -> set[str]:
    """The flags the Linux kernel reports for the first CPU, an independent source of truth for AMX."""
    for line in CPUINFO.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    pytest.skip("/proc/cpuinfo lists no CPU flags on this machine")


@pytest.mark.skipif(not CPUINFO.is_file(), reason="/proc/cpuinfo exists on Linux only")
def test_fast_bfloat16_is_detected_exactly_where_the_kernel_reports_amx_bf16():
    has_amx = "amx_bf16" in cpu_flags()
    precision.cpu_has_fast_bfloat16.cache_clear()  # detect now, not whatever an earlier call cached
    try:
        assert precision.cpu_has_fast_bfloat16() is has_amx
        assert precision.autocast_dtype("auto", torch.device("cpu")) is (torch.bfloat16 if has_amx else None)
    finally:
        precision.cpu_has_fast_bfloat16.cache_clear()
