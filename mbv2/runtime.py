"""How an mbv2 process is set up: MKL's code path, the allocator, Paddle's CPU threads,
the device.

`configure_process()` is what every entry point calls first, before paddle is imported;
nothing here runs on import.

Paddle's dygraph runs its CPU math (MKL GEMMs behind the 1x1 convs, OpenMP loops, the
depthwise custom op, which shares Paddle's OpenMP runtime) on one thread unless told
otherwise; OMP_NUM_THREADS alone does not change that. Measured here: a 1x1 conv
forward + backward took 39 ms on one thread and 26 ms on two.
"""
from __future__ import annotations

import ctypes
import logging
import os
import platform
import warnings

log = logging.getLogger(__name__)

MALLOC_ENV = "MBV2_MALLOC"
# glibc mallopt() parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8
# What configure_malloc() did in this process: "kept-heap", "system" (opted out),
# "unsupported" (not glibc), "other-allocator" (malloc is not glibc's, see
# malloc_library) or "failed"; None before it ran.
malloc_mode: str | None = None


# CPU flags MKL's AVX-512 (Skylake-SP level) code path uses.
AVX512_FLAGS = frozenset({"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"})


def cpu_flags() -> set[str]:
    """The instruction-set flags /proc/cpuinfo reports (empty off Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# CPU flags of the bfloat16 dot-product instructions oneDNN's bf16 kernels use.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def has_bf16(flags: set[str] | None = None) -> bool:
    """Whether this CPU (or the flags given) has bfloat16 dot products."""
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in BF16_FLAGS)


def has_avx512_bf16() -> bool:
    """Whether this CPU has AVX512-BF16, which mbv2's own bf16 code (the predictor's
    products) is written in; has_bf16 also counts AMX, which oneDNN uses."""
    return "avx512_bf16" in cpu_flags()


def mkl_cpu_type(flags: set[str] | None = None) -> str | None:
    """The MKL_DEBUG_CPU_TYPE for this CPU, or None to leave MKL alone.

    Paddle's bundled MKL (2019) runs a generic SSE path on AMD CPUs unless this variable
    names a code path; Intel CPUs ignore it. 5 is the AVX2 path, 7 the AVX-512 one.
    Measured on this project's 2-core AMD EPYC (AVX-512): single-thread SGEMM 1024^3 at
    111 GFLOP/s with 5 and 185 with 7; a MobileNetV2 x1.0 training step 10-20 % faster
    with 7. 8 (a Xeon Phi path) crashes there with SIGILL, so only flags the CPU reports
    choose a path."""
    flags = cpu_flags() if flags is None else flags
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    if AVX512_FLAGS <= flags:
        return "7"
    if {"avx2", "fma"} <= flags:
        return "5"
    return None


# Paddle's warnings on every import / training step that say nothing about the run.
QUIET_WARNINGS = ("No ccache found", "When training, we now always track global mean",
                  "To copy construct from a tensor")


def configure_process(threads: int | None = None) -> None:
    """Set up this process for training or inference with Paddle on this machine:

    * `MKL_DEBUG_CPU_TYPE` (see `mkl_cpu_type`): Paddle's bundled MKL takes a slow generic
      path on AMD CPUs unless this names the AVX2 or AVX-512 one before the library loads
      (measured: 1.6-2.2x faster training steps with AVX2, 10-20 % more with AVX-512);
      Intel CPUs ignore it; a value the user set is kept;
    * the kept heap (`configure_malloc`; MBV2_MALLOC=system opts out);
    * Paddle's noise warnings off;
    * `threads`: Paddle's CPU math threads (imports paddle), when given.

    Call it before paddle is imported: MKL reads its variable once, when it loads.
    Idempotent."""
    mkl_type = mkl_cpu_type()
    if mkl_type:
        os.environ.setdefault("MKL_DEBUG_CPU_TYPE", mkl_type)
    configure_malloc()
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    if threads is not None:
        set_cpu_threads(threads)


def describe_process() -> str:
    """One line for the run log: the allocator and the MKL code path in use."""
    return (f"CPU allocator: {describe_malloc()}; MKL code path: MKL_DEBUG_CPU_TYPE="
            f"{os.environ.get('MKL_DEBUG_CPU_TYPE', 'unset')}")


def configure_malloc() -> str:
    """Keep freed CPU memory in the process heap instead of handing it back to the OS.

    Paddle (and PyTorch) allocate every CPU tensor with malloc and free it when the
    autograd graph lets go of it. glibc serves blocks over its mmap threshold (128 KiB to
    32 MiB) with a fresh mmap and unmaps them on free, so the activations of each training
    step are page-faulted in again, page by page, on every step. Measured on this 2-core
    machine (page faults cost ~10 us each here): x1.0 at 224 px, batch 32, 1,020-1,120 ms a
    step with 190k-290k faults, 630 ms and no faults with the heap kept; at 32 px, batch
    128, system time per step went from 11 ms to 1 ms.

    This turns off mmap for allocations (M_MMAP_MAX=0), never trims the heap top
    (M_TRIM_THRESHOLD), and grows the heap 64 MiB at a time (M_TOP_PAD). The cost: the
    process keeps its peak memory until it exits, as a caching allocator does.
    `MBV2_MALLOC=system` in the environment leaves glibc's defaults alone. Idempotent;
    a no-op off glibc ("unsupported") and where another allocator serves malloc
    ("other-allocator": jemalloc, tcmalloc and the like keep their own settings)."""
    global malloc_mode
    if malloc_mode is not None:
        return malloc_mode
    if os.environ.get(MALLOC_ENV, "").strip().lower() in ("system", "0", "off", "default"):
        malloc_mode = "system"
    elif platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        malloc_mode = "unsupported"
    elif malloc_library() is not None:
        malloc_mode = "other-allocator"
    else:
        try:
            mallopt = ctypes.CDLL(None).mallopt
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            # -1 as a size_t: never trim. mallopt returns 1 on success.
            # one arena: a block freed by one of Paddle's threads and allocated by another
            # would otherwise live in a per-thread arena, whose heaps glibc does unmap
            ok = (mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, -1) == 1
                  and mallopt(_M_TOP_PAD, 64 << 20) == 1 and mallopt(_M_ARENA_MAX, 1) == 1)
            malloc_mode = "kept-heap" if ok else "failed"
        except (OSError, AttributeError):
            malloc_mode = "failed"
    return malloc_mode


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def malloc_library() -> str | None:
    """The file of the malloc this process calls when it is not glibc's own (an allocator
    put in front by LD_PRELOAD, such as jemalloc or tcmalloc), else None.

    glibc's mallopt() does not reach such an allocator, and some of them (tcmalloc)
    answer mallopt() with success while doing nothing, so configure_malloc() asks first."""
    try:
        process, libc = ctypes.CDLL(None), ctypes.CDLL("libc.so.6")
        address = ctypes.cast(process.malloc, ctypes.c_void_p).value
        if address == ctypes.cast(libc.malloc, ctypes.c_void_p).value:
            return None
        info = _DlInfo()
        process.dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
        if process.dladdr(ctypes.c_void_p(address), ctypes.byref(info)) and info.dli_fname:
            return os.fsdecode(info.dli_fname)
        return "an allocator loaded before glibc"
    except (OSError, AttributeError):
        return None


def describe_malloc() -> str:
    """One line for the run log: what configure_malloc() did."""
    if configure_malloc() == "other-allocator":
        return f"{malloc_library()} (left to its own settings; mbv2 sets only glibc's)"
    return {
        "kept-heap": "glibc heap kept between steps (no mmap, no trim; MBV2_MALLOC=system "
                     "to turn off)",
        "system": "glibc defaults (MBV2_MALLOC=system)",
        "unsupported": "system default (not glibc)",
        "failed": "system default (mallopt refused the settings)",
    }.get(str(configure_malloc()), "system default")


class DeviceError(ValueError):
    """A device this machine does not have; the message names the key."""


def select_device(requested: str, key: str = "trainer.device") -> str:
    """`auto`: the GPU when Paddle is built with CUDA and sees one, else the CPU. A GPU
    asked for on a machine without one is a sentence naming `key`, not Paddle's error."""
    import paddle

    has_gpu = paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
    if requested == "auto":
        return "gpu" if has_gpu else "cpu"
    if str(requested).startswith("gpu") and not has_gpu:
        why = "sees no GPU" if paddle.is_compiled_with_cuda() else "is built without CUDA"
        raise DeviceError(f"{key}={requested}: this Paddle {why}; use {key}=cpu (or auto)")
    return requested


def default_cpu_threads(processes_on_node: int = 1) -> int:
    """The cores this process may use, shared evenly with the other processes of a
    data-parallel launch on the same node."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, processes_on_node))


def set_cpu_threads(threads: int) -> None:
    """Paddle's CPU math threads (MKL and OpenMP) for this process."""
    from paddle.base import core

    core.set_num_threads(int(threads))
    log.info("CPU math threads: %d", threads)
