import gc
import platform
import subprocess
import sys

import pytest

from engine import host

# Grows the heap by 40 MB of 1-4 MB blocks and frees them, five times over as ticks do, touching
# every page; prints the page faults of rounds 2-5.
_ROUNDS = """
import resource, sys, torch
from engine import host
if sys.argv[1] == "settled":
    assert host.keep_heap_pages()
def round_():
    blocks = [torch.ones(256 * 1024 * (1 + i % 4)) for i in range(16)]
    del blocks
round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    round_()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults_after_first_round(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _ROUNDS, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_kept_heap_pages_are_not_faulted_in_again():
    # A round is ~10k pages: by default glibc maps most blocks afresh (or trims the freed heap top)
    # and faults them in again every round; kept, the pages are reused once the heap has grown.
    assert _faults_after_first_round("default") > 10_000
    assert _faults_after_first_round("settled") < 5_000


def test_settle_freezes_and_unsettle_thaws():
    try:
        host.settle()
        assert gc.get_freeze_count() > 0
    finally:
        host.unsettle()
    assert gc.get_freeze_count() == 0


def test_cpuinfo_reads_the_first_processors_field(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Xeon: the test one\n\n"
                    "processor\t: 1\nvendor_id\t: AuthenticAMD\n")
    assert host.cpuinfo("vendor_id", str(info)) == "GenuineIntel"
    assert host.cpuinfo("model name", str(info)) == "Xeon: the test one"
    assert host.cpuinfo("flags", str(info)) == ""
    assert host.cpuinfo("vendor_id", str(tmp_path / "missing")) == ""
