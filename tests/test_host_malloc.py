"""train.tune_host_malloc: a step's freed activations come back without page faults."""
from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")

# like a step: allocate 150 activations of 2 MiB, free them all, then do it again; count the page faults of the
# second round (a 4 KiB page each: 512 per tensor if the memory went back to the OS)
SCRIPT = """
import json, resource, sys, torch
from fsdp_ft.runtime import host_malloc
done = host_malloc.tune() if sys.argv[1] == "tuned" else "default"
def step():
    ts = [torch.empty(512 * 1024).fill_(1.0) for _ in range(150)]
    del ts
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, "done": done}))
"""


def _second_round_faults(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tuned_malloc_reuses_freed_memory_where_glibc_defaults_fault_it_in_again():
    default, tuned = _second_round_faults("default"), _second_round_faults("tuned")
    assert tuned["done"].startswith("glibc: mmap threshold 32 MiB")
    pages = 150 * 512
    assert default["faults"] > 0.5 * pages, default  # glibc gave the freed memory back, so it faults again
    assert tuned["faults"] < 0.2 * pages, tuned      # kept in the heap: reused (measured 5-10% of the pages)


# loading: whole weights read and dropped between small tensors that stay; the holes stay resident until trimmed
RELEASE = """
import json, sys, torch
from fsdp_ft.runtime import host_malloc
host_malloc.tune()
def anon():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon:")) // 1024
kept = []
for _ in range(60):
    whole = torch.ones(2 << 20)  # 8 MiB read whole, then dropped
    kept.append(whole[:1024].clone())  # the small part that stays (a quantized shard)
    del whole
before = anon()
host_malloc.release_free()
print(json.dumps({"before": before, "after": anon()}))
"""


def test_release_free_hands_the_holes_of_a_load_back():
    out = subprocess.run([sys.executable, "-c", RELEASE], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["before"] - r["after"] > 200, r  # MiB: most of the 60 x 8 MiB of holes went back to the OS



def test_training_tunes_malloc_unless_told_not_to(tmp_path, monkeypatch):
    """The promise is about training, not the function: a default run calls host_malloc.tune() (whose effect the
    tests above measure) and its setup row says what it applied; a run with train.tune_host_malloc=false never
    calls it and its row says so. Two 1-step runs in this process (no interpreter start-up)."""
    from conftest import FAST, TINY
    from fsdp_ft.api import train
    from fsdp_ft.config import load_config
    from fsdp_ft.observability.metrics import read_metrics
    from fsdp_ft.runtime import host_malloc

    calls = []
    real = host_malloc.tune
    monkeypatch.setattr(host_malloc, "tune", lambda: calls.append(1) or real())
    rows = {}
    for name, extra in (("off", ["train.tune_host_malloc=false"]), ("default", [])):
        calls.clear()
        out = tmp_path / name
        train(load_config(TINY, [f"output_dir={out}", *FAST, "train.max_steps=1", "data.eval=null", *extra]))
        rows[name] = (next(r for r in read_metrics(out) if r.get("split") == "setup")["host_malloc"], len(calls))
    assert rows["off"] == ("default (train.tune_host_malloc=false)", 0), rows
    assert rows["default"][1] == 1, rows
    assert rows["default"][0] == "glibc: mmap threshold 32 MiB, trim threshold 2047 MiB", rows
