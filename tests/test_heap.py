"""Memory the heap holds for nobody (pixclass.heap). The pattern that made a features pass grow
by gigabytes, rebuilt with raw malloc: a large block is freed (glibc then raises its mmap
threshold), then batch-sized blocks each followed by a small one that stays, then the batches
are freed. Left alone the heap keeps all of it; inside large_blocks_mapped the batches come from
mmap and go back at once; return_freed_memory gives back the free pages after the fact. Each case
runs in its own process so the test's own heap does not matter."""

import subprocess
import sys

import pytest

_SCRIPT = r"""
import ctypes, re, sys
from pathlib import Path
from pixclass.heap import large_blocks_mapped, return_freed_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
def rss_mb():
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) // 1024
def batches():
    big, small = [], []
    for _ in range(100):  # 200 MB of 2 MB "batches", a small kept result after each
        b = libc.malloc(2 * 2**20)
        libc.memset(b, 1, 2 * 2**20)
        big.append(b)
        small.append(libc.malloc(4096))
    for b in big:
        libc.free(b)
libc.free(libc.malloc(16 * 2**20))  # a large block freed: the dynamic threshold rises above 2 MB
base = rss_mb()
if sys.argv[1] == "mapped":
    with large_blocks_mapped():
        batches()
else:
    batches()
    if sys.argv[1] == "trimmed":
        return_freed_memory()
print(rss_mb() - base)
"""


def _growth_mb(case: str) -> int:
    out = subprocess.run([sys.executable, "-c", _SCRIPT, case], capture_output=True, text=True, check=True)
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_batches_go_back_to_the_system():
    assert _growth_mb("alone") >= 150  # the control: the heap keeps the freed batches
    assert _growth_mb("mapped") <= 30
    assert _growth_mb("trimmed") <= 30


def test_calibration_batches_follow_the_image_size():
    from pixclass.train.calibrate import images_per_batch
    assert images_per_batch(32) == 128
    assert images_per_batch(224) <= 8  # a batch of 128 at 224 px held gigabytes
    assert images_per_batch(4096) >= 4
