"""The allocator setting: with it, repeated large-tensor work stops faulting its pages in again."""

import resource
import subprocess
import sys

import pytest

SCRIPT = """
import resource, sys, torch
from diffdenoise.allocator import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retain" else None
x = torch.rand(64, 512, 512)  # 64 MiB: above glibc's largest dynamic mmap threshold
(x * 2).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(30):
    (x * 2).sum()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_retained_memory_is_not_faulted_in_again():
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
        applied, count = out.stdout.split()
        return applied, int(count)

    applied, retained = faults("retain")
    if applied != "True":
        pytest.skip("not glibc: mallopt unavailable")
    _, default = faults("default")
    pages = 64 * 512 * 512 * 4 // resource.getpagesize()
    assert default > 20 * pages  # each of the 30 products faults its 64 MiB result in again
    assert retained < default / 4  # a one-off cost (a few blocks): later products reuse them from the heap
