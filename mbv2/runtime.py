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
    * the kept heap (`configure_malloc`; MBV2_MALLOC=system opts out), backed by
      transparent huge pages where the kernel gives them on request
      (`configure_hugepages`; MBV2_HUGEPAGES=off opts out);
    * Paddle's noise warnings off;
    * `threads`: Paddle's CPU math threads (imports paddle), when given.

    Call it before paddle is imported: MKL reads its variable once, when it loads.
    Idempotent."""
    mkl_type = mkl_cpu_type()
    if mkl_type:
        os.environ.setdefault("MKL_DEBUG_CPU_TYPE", mkl_type)
    configure_malloc()
    configure_hugepages()
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    if threads is not None:
        set_cpu_threads(threads)


def describe_process() -> str:
    """One line for the run log: the allocator and the MKL code path in use."""
    return (f"CPU allocator: {describe_malloc()}; heap pages: {describe_hugepages()}; "
            f"MKL code path: MKL_DEBUG_CPU_TYPE={os.environ.get('MKL_DEBUG_CPU_TYPE', 'unset')}")


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


HUGEPAGES_ENV = "MBV2_HUGEPAGES"
THP_POLICY_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
_MADV_HUGEPAGE = 14  # asm-generic/mman-common.h
_HUGE = 2 << 20  # the x86-64 and arm64 (4 KiB base pages) huge page
# The heap configure_hugepages() reserves: half the machine's memory, at most this much.
_RESERVE_MAX = 64 << 30
# What configure_hugepages() did in this process: "madvise" (the reserved heap marked for
# huge pages), "kernel" (the kernel backs all memory with them already), "off" (opted
# out), "no-kept-heap" (configure_malloc did not keep the heap), "unavailable" (no
# transparent huge pages here), "strict-overcommit" (see _mark_heap) or "failed"; None
# before it ran.
hugepage_mode: str | None = None
# the bytes of heap it marked
hugepage_bytes = 0


def thp_policy(path: str = THP_POLICY_FILE) -> str | None:
    """The kernel's transparent huge page policy ("always", "madvise" or "never"), None
    where it cannot be read (not Linux, no THP)."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def heap_range() -> tuple[int, int] | None:
    """The [start, end) addresses of this process's brk heap, None where it has none."""
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.rstrip().endswith("[heap]"):
                    start, end = line.split()[0].split("-")
                    return int(start, 16), int(end, 16)
    except OSError:
        pass
    return None


def configure_hugepages() -> str:
    """Back the kept heap with transparent huge pages (2 MiB) where the kernel gives them
    only to memory marked for them (policy "madvise", the common default).

    mbv2's depthwise and batch norm ops stream through activations of 50-150 MB at 224 px
    (eight channel planes at once in the depthwise conv); with 4 KiB pages each such
    tensor spans 12k-38k pages, far more than the TLB holds. Measured on this project's
    2-core EPYC, alternated processes, 4 KiB -> huge pages: x1.0 at 224 px, batch 32,
    training steps 622 -> 593 ms (medians of 8 pairs, through glibc's tunable), 605 -> 604
    ms median and 591 -> 581 ms fastest (6 pairs, this function); x1.0 at 32 px, batch 128,
    74 -> 70 ms (4 of 5 pairs faster); PyTorch's channels_last step unchanged.

    glibc marks its heap for huge pages only when the process starts with the tunable
    `glibc.malloc.hugetlb=1`, which a running process cannot set. So this grows the kept
    heap once to half the machine's memory (at most 64 GiB: address space, not memory; a
    page costs memory when first touched, as before) and marks that range; allocations
    beyond it get normal pages. Only with the kept heap (`configure_malloc`), whose
    allocations all come from that one range. `MBV2_HUGEPAGES=off` opts out. Idempotent."""
    global hugepage_mode
    if hugepage_mode is not None:
        return hugepage_mode
    if os.environ.get(HUGEPAGES_ENV, "").strip().lower() in ("off", "0", "no", "false"):
        hugepage_mode = "off"
    elif configure_malloc() != "kept-heap":
        hugepage_mode = "no-kept-heap"
    else:
        policy = thp_policy()
        if policy == "always":
            hugepage_mode = "kernel"
        elif policy != "madvise":
            hugepage_mode = "unavailable"
        else:
            hugepage_mode = _mark_heap()
    return hugepage_mode


def _mark_heap() -> str:
    """configure_hugepages' work under the "madvise" policy: grow the heap, mark it.
    Not under strict overcommit (vm.overcommit_memory=2), where the grown heap would hold
    its size of the machine's commit limit, which other processes then cannot have."""
    try:
        with open("/proc/sys/vm/overcommit_memory", encoding="ascii") as f:
            if f.read().strip() == "2":
                return "strict-overcommit"
    except OSError:
        pass
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        libc = ctypes.CDLL(None)
        libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
        libc.free.restype, libc.free.argtypes = None, [ctypes.c_void_p]
        libc.madvise.restype = ctypes.c_int
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        # freed at once: the kept heap never trims, so the range stays the heap's
        block = libc.malloc(min(memory // 2, _RESERVE_MAX))
        if not block:
            return "failed"
        libc.free(block)
        heap = heap_range()
        if heap is None:
            return "failed"
        start = (heap[0] + _HUGE - 1) // _HUGE * _HUGE
        if heap[1] - start < _HUGE:
            return "failed"
        if libc.madvise(start, heap[1] - start, _MADV_HUGEPAGE) != 0:
            return "failed"
        global hugepage_bytes
        hugepage_bytes = heap[1] - start
        return "madvise"
    except (OSError, AttributeError, ValueError):
        return "failed"


def describe_hugepages() -> str:
    """One line for the run log: what configure_hugepages() did."""
    mode = configure_hugepages()
    if mode == "madvise":
        return (f"transparent huge pages on the first {hugepage_bytes / 2**30:.0f} GiB of the "
                f"kept heap ({HUGEPAGES_ENV}=off to turn off)")
    return {
        "kernel": "transparent huge pages (the kernel's policy: always)",
        "off": f"4 KiB ({HUGEPAGES_ENV}=off)",
        "no-kept-heap": "as the allocator gives them",
        "unavailable": "4 KiB (no transparent huge pages on request here)",
        "strict-overcommit": "4 KiB (strict overcommit: the heap is not grown to mark it)",
        "failed": "4 KiB (the heap could not be marked)",
    }.get(mode, "4 KiB")


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
