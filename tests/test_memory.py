"""cftune.memory: freed CPU tensors go back to the system (glibc's mmap threshold fixed)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cftune import memory

# In a fresh process: a 16 MiB tensor freed raises glibc's dynamic threshold to 16 MiB, so the
# next 4 MiB tensor comes from the heap (whose freed pieces stay in the process) unless the
# threshold was fixed; `hblkhd` counts the bytes in mappings of their own.
PROBE = """
import ctypes, sys, torch
from cftune import memory
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
big = torch.empty(16 << 20, dtype=torch.uint8)
del big
if sys.argv[1] == "fixed":
    assert memory.set_mmap_threshold(1 << 20) == 1 << 20
before = libc.mallinfo2().hblkhd
t = torch.empty(4 << 20, dtype=torch.uint8)
print(libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.skipif(memory._glibc() is None or not hasattr(memory._glibc(), "mallinfo2"),
                    reason="glibc >= 2.33 only (mallopt, mallinfo2)")
def test_a_fixed_threshold_maps_mid_sized_tensors_of_their_own():
    def mapped(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True,
                              text=True, check=True)
        return int(done.stdout.split()[-1])
    assert mapped("default") == 0  # glibc's own rule: from the heap, kept when freed
    assert mapped("fixed") >= 4 << 20


def test_zero_leaves_glibc_alone():
    assert memory.set_mmap_threshold(0) is None
