"""The process-level CPU settings of mbv2.runtime: the kept glibc heap and thread counts."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import warnings

import pytest

# Allocate, touch and free a 64 MiB Paddle tensor; report, for each measured round, the
# minor page faults, the block's address and the mapping it lies in. With glibc's
# defaults the block is a fresh mmap every time (each round faults it in again); with
# mbv2's kept heap it lies in the brk heap and the next round reuses its pages.
PROBE = r"""
import json, resource, sys
from mbv2 import runtime
runtime.configure_process()
import paddle

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def mapping(address):
    with open("/proc/self/maps") as maps:
        for line in maps:
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            if start <= address < end:
                fields = line.split()
                return fields[5] if len(fields) > 5 else "anonymous mmap"
    return "unmapped"

def round_():
    t = paddle.ones([16 * 1024 * 1024], dtype="float32")
    address = t.data_ptr()
    float(t.sum())
    del t
    return address, mapping(address)

# warm-up: the first touches of the heap, Paddle's own start-up allocations and the
# caches its first ops fill (small blocks that can land where the big one was freed and
# grow the heap again a few times)
for _ in range(4):
    round_()
rounds = []
for _ in range(4):
    f0 = faults()
    address, region = round_()
    rounds.append({"faults": faults() - f0, "address": address, "region": region})
print(json.dumps({"mode": runtime.malloc_mode, "rounds": rounds,
                  "describe": runtime.describe_malloc()}))
"""

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the kept heap is a glibc mallopt setting")


def _probe(env_extra: dict[str, str]) -> dict:
    env = dict(os.environ)
    env.pop("MBV2_MALLOC", None)
    env.update(env_extra)
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    probe["faults"] = [r["faults"] for r in probe["rounds"]]
    return probe


@glibc_only
def test_kept_heap_reuses_pages_and_system_opt_out_does_not():
    from mbv2 import runtime

    other = runtime.malloc_library()
    if other:
        pytest.skip(f"malloc here is {other} (LD_PRELOAD={os.environ.get('LD_PRELOAD')}), "
                    "not glibc's: the kept heap does not apply")
    kept = _probe({})
    system = _probe({"MBV2_MALLOC": "system"})
    assert kept["mode"] == "kept-heap", kept
    assert system["mode"] == "system", system
    assert "MBV2_MALLOC=system" in kept["describe"]
    # What mbv2 sets: glibc serves the block from its brk heap and hands the same block
    # out again; with glibc's defaults it is a mapping of its own.
    assert all(r["region"] == "[heap]" for r in kept["rounds"]), kept
    assert all(r["region"] != "[heap]" for r in system["rounds"]), system
    # What that buys: 64 MiB is 16,384 small pages (or 32 huge ones); glibc's defaults
    # fault the block in again every round, the kept heap reuses pages it already has.
    assert min(system["faults"]) >= 30, system
    assert min(kept["faults"]) < min(system["faults"]) / 4, (kept, system)
    if max(kept["faults"]) >= min(system["faults"]) / 4:
        # some round still grew the heap (small blocks Paddle keeps landed where the big
        # one was freed); say so with the figures rather than hide it
        warnings.warn(f"kept heap grew again after warm-up: kept {kept['rounds']}, "
                      f"system {system['rounds']}")


def test_configure_malloc_is_idempotent():
    from mbv2 import runtime

    first = runtime.configure_malloc()
    assert runtime.configure_malloc() == first
    assert first in ("kept-heap", "system", "unsupported", "other-allocator", "failed")


def test_default_cpu_threads_shares_cores_between_processes():
    from mbv2.runtime import default_cpu_threads

    cores = default_cpu_threads(1)
    assert cores >= 1
    assert default_cpu_threads(cores * 4) == 1
    assert default_cpu_threads(2) == max(1, cores // 2)


def test_mkl_cpu_type_follows_the_cpu_flags(monkeypatch):
    from mbv2 import runtime

    monkeypatch.setattr(runtime.platform, "machine", lambda: "x86_64")
    assert runtime.mkl_cpu_type(set(runtime.AVX512_FLAGS) | {"avx2", "fma"}) == "7"
    # AVX-512 foundation alone is not the Skylake-SP feature set MKL's path 7 needs
    assert runtime.mkl_cpu_type({"avx2", "fma", "avx512f"}) == "5"
    assert runtime.mkl_cpu_type({"avx2", "fma"}) == "5"
    assert runtime.mkl_cpu_type({"avx", "sse4_2"}) is None
    monkeypatch.setattr(runtime.platform, "machine", lambda: "aarch64")
    assert runtime.mkl_cpu_type(set(runtime.AVX512_FLAGS)) is None


def test_import_changes_nothing_and_configure_process_sets_mkl_path():
    """Importing mbv2 (even the network) leaves the process alone; configure_process()
    names MKL's code path for this CPU unless the user already did, and keeps the heap."""
    from mbv2 import runtime

    expected = runtime.mkl_cpu_type()
    probe = ("import os, mbv2.model, mbv2.run, mbv2.eval, mbv2.export, mbv2.predict\n"
             "from mbv2 import runtime\n"
             "print(os.environ.get('MKL_DEBUG_CPU_TYPE'), runtime.malloc_mode)\n"
             "runtime.configure_process()\n"
             "print(os.environ.get('MKL_DEBUG_CPU_TYPE'), runtime.malloc_mode)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("MKL_DEBUG_CPU_TYPE", "MBV2_MALLOC")}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    before, after = out.stdout.strip().splitlines()[-2:]
    assert before == "None None"
    kept = "kept-heap" if platform.libc_ver()[0] == "glibc" else "unsupported"
    if runtime.malloc_library():
        kept = "other-allocator"
    assert after == f"{expected} {kept}"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env={**env, "MKL_DEBUG_CPU_TYPE": "5"})
    assert out.stdout.strip().splitlines()[-1].split()[0] == "5"  # a user's own choice stays


def test_bf16_precision_is_checked_against_the_cpu(monkeypatch):
    from mbv2 import predict, runtime

    assert runtime.has_bf16({"avx512f", "avx512_bf16"}) and runtime.has_bf16({"amx_bf16"})
    assert not runtime.has_bf16({"avx512f", "avx2"})
    assert predict.check_precision("fp32") == "fp32"
    with pytest.raises(runtime.DeviceError, match="precision='fp16': choose one of fp32, bf16"):
        predict.check_precision("fp16")
    monkeypatch.setattr(runtime, "has_bf16", lambda flags=None: False)
    with pytest.raises(runtime.DeviceError, match="precision=bf16: this CPU reports none of "
                                                  "avx512_bf16, amx_bf16.*use precision=fp32"):
        predict.check_precision("bf16")


# The heap's mapping flags after configure_process(): whether the VMA holding the middle
# of a 64 MiB malloc'd block is marked for transparent huge pages ("hg" in its VmFlags;
# the heap's first 2 MiB-unaligned bytes stay unmarked, and a block can start there), and
# the hugepage mode and log line.
HUGE_PROBE = r"""
import ctypes, json
from mbv2 import runtime
runtime.configure_process()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
block = libc.malloc(64 << 20)
libc.memset(block, 1, 64 << 20)
flags, huge = None, 0
with open("/proc/self/smaps") as smaps:
    inside = False
    for line in smaps:
        head = line.split()
        if "-" in head[0] and ":" not in head[0]:
            start, end = (int(v, 16) for v in head[0].split("-"))
            inside = start <= block + (32 << 20) < end
        elif inside and line.startswith("VmFlags:"):
            flags = head[1:]
        elif inside and line.startswith("AnonHugePages:"):
            huge = int(head[1])
print(json.dumps({"mode": runtime.hugepage_mode, "flags": flags, "huge_kb": huge,
                  "describe": runtime.describe_hugepages()}))
"""


def _huge_probe(env_extra: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MBV2_MALLOC", "MBV2_HUGEPAGES")}
    env.update(env_extra)
    proc = subprocess.run([sys.executable, "-c", HUGE_PROBE], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@glibc_only
def test_kept_heap_is_marked_for_huge_pages_where_the_kernel_asks_for_it():
    """Under the kernel's "madvise" policy the kept heap's range is marked for transparent
    huge pages (a block malloc'd after start-up lies in it); MBV2_HUGEPAGES=off and
    MBV2_MALLOC=system leave the pages alone, and the log line says which."""
    from mbv2 import runtime

    if runtime.malloc_library():
        pytest.skip("malloc here is not glibc's: no kept heap to mark")
    policy = runtime.thp_policy()
    on = _huge_probe({})
    off = _huge_probe({"MBV2_HUGEPAGES": "off"})
    system = _huge_probe({"MBV2_MALLOC": "system"})
    assert off["mode"] == "off" and "MBV2_HUGEPAGES=off" in off["describe"], off
    assert system["mode"] == "no-kept-heap", system
    assert "hg" not in (off["flags"] or []) and "hg" not in (system["flags"] or []), (off, system)
    if policy == "madvise" and on["mode"] == "strict-overcommit":
        assert "strict overcommit" in on["describe"], on
    elif policy == "madvise":
        assert on["mode"] == "madvise", on
        assert "hg" in on["flags"], on  # the block's mapping is marked
        assert "transparent huge pages" in on["describe"] and "GiB" in on["describe"], on
        if on["huge_kb"] == 0:
            # marked, yet the kernel found no free 2 MiB page (fragmented memory): say so
            warnings.warn(f"heap marked for huge pages but none backs the block: {on}")
    elif policy == "always":
        assert on["mode"] == "kernel", on
    else:
        assert on["mode"] == "unavailable", (policy, on)


def test_thp_policy_reads_the_bracketed_choice(tmp_path):
    from mbv2 import runtime

    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert runtime.thp_policy(str(path)) == "madvise"
    path.write_text("[always] madvise never\n")
    assert runtime.thp_policy(str(path)) == "always"
    path.write_text("garbage\n")
    assert runtime.thp_policy(str(path)) is None
    assert runtime.thp_policy(str(tmp_path / "missing")) is None
