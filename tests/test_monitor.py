"""The process-tree memory sampler sees children and names Ray workers by their title."""

import subprocess
import sys
import time

import psutil

from simulations.monitor import GIB, TreeMemory, process_kind

HOLD_MIB = 200
CHILD = f"import time; block = bytearray({HOLD_MIB} * 2**20); time.sleep(3)"


def test_peak_includes_a_child_process_and_its_kind():
    with TreeMemory(interval=0.1) as memory:
        child = subprocess.Popen([sys.executable, "-c", CHILD])
        time.sleep(1.5)
        child.wait()
    own = psutil.Process().memory_info().rss
    assert memory.peak_single >= HOLD_MIB * 2**20
    assert memory.peak_total >= own + HOLD_MIB * 2**20 * 0.9
    assert memory.peak_processes >= 2 and memory.samples >= 5
    assert f"{sys.executable.rsplit('/', 1)[-1]} -c" in memory.kinds()
    report = memory.report()
    assert report["peak_rss_gb"] == round(memory.peak_total / GIB, 3)


def test_ray_titles_are_shortened():
    class Fake:
        def cmdline(self):
            return ["ray::ClientAppActor.run", ""]

        def name(self):
            return "ray::ClientApp"

    assert process_kind(Fake()) == "ray::ClientAppActor"
