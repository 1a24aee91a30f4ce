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
from fsdp_ft import host_malloc
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


def _thp_usable() -> bool:
    from fsdp_ft import host_malloc

    return host_malloc.hugepage_env({}) is not None


# allocate and fill a fresh 96 MiB buffer (above the 32 MiB mmap threshold, as a 512-token row's logits) 3 times
BIG = """
import json, resource, torch
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    torch.empty(24 << 20).fill_(1.0)
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _big_buffer_faults(env: dict) -> int:
    out = subprocess.run([sys.executable, "-c", BIG], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["faults"]


@pytest.mark.skipif(not _thp_usable(), reason="needs glibc >= 2.35 and transparent huge pages not 'never'")
def test_huge_page_tunable_cuts_the_page_faults_of_big_buffers():
    import os

    from fsdp_ft import host_malloc

    plain = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    default, huge = _big_buffer_faults(plain), _big_buffer_faults(host_malloc.hugepage_env(plain))
    pages = 3 * (96 << 20) // 4096
    assert default > 0.9 * pages, default  # every 4 KiB page of every fresh mapping faults
    assert huge < 0.1 * pages, huge        # 2 MiB pages: 512 times fewer (measured ~2% incl. start-up)


def test_huge_page_env_keeps_other_tunables_and_the_users_choice():
    from fsdp_ft import host_malloc

    if not _thp_usable():
        assert host_malloc.hugepage_env({}) is None
        return
    assert host_malloc.hugepage_env({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    mixed = host_malloc.hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"})
    assert mixed["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1" and mixed["X"] == "1"
    assert host_malloc.hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None  # set by the user


@pytest.mark.skipif(not _thp_usable(), reason="needs glibc >= 2.35 and transparent huge pages not 'never'")
def test_fsdp_ft_train_restarts_itself_with_huge_pages(tmp_path, monkeypatch):
    """glibc reads tunables only at start-up: `fsdp-ft train` execs itself with the tunable before torch loads,
    and the setup row says so; train.tune_host_malloc=false leaves the process alone."""
    from conftest import TINY, cli
    from fsdp_ft.metrics import read_metrics

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    for tune in ("true", "false"):
        out = tmp_path / tune
        cli("train", str(TINY), f"output_dir={out}", "train.max_steps=1", f"train.tune_host_malloc={tune}")
        setup = next(r for r in read_metrics(out) if r.get("split") == "setup")
        assert ("huge pages (glibc.malloc.hugetlb=1" in setup["host_malloc"]) is (tune == "true"), setup["host_malloc"]
