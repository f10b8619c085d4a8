"""Freed host memory stays with the process (randteach.train.host_memory): the next step's feature maps reuse
it instead of faulting fresh pages in. Measured in a fresh process, with the kernel's page-fault count."""
import os
import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from randteach.train.host_memory import keep_freed_memory

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):  # a step's six 16 MiB feature maps, freed together at its end
        maps = [torch.ones(16 << 18) for _ in range(6)]
        del maps
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults()
default = faults()
kept = keep_freed_memory(torch.device("cpu"))
faults()
print(default, faults() if kept else -1)
"""


def test_a_training_process_keeps_its_freed_feature_maps():
    if "[always]" in _read("/sys/kernel/mm/transparent_hugepage/enabled"):
        pytest.skip("transparent huge pages for every mapping: a 16 MiB map faults a handful of pages")
    # a fixed mmap threshold, so that the maps come from mmap without the setting, every time: glibc's own
    # threshold adapts to the blocks freed, and served them from the heap or not, run to run
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 << 10)}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, env=env).stdout
    default, kept = map(int, out.split())
    if kept < 0:
        pytest.skip("the C library is not glibc: malloc is left as it is")
    assert default > 5 * 6 * 4096 // 2, default  # the 16 MiB maps faulted in page by page (4 KiB), five times
    assert kept < default / 10, (default, kept)


def _read(path: str) -> str:
    try:
        return open(path).read()
    except OSError:
        return ""
