"""This CPU's FP32 peak and the achieved GFLOP/s of a backend.

peak GFLOP/s = cores used x FP32 lanes per FMA (16 with avx512f, 8 with avx2, 4 else)
               x FMA units per core x 2 (an FMA is a multiply and an add) x clock in GHz.
The FMA units per core are not readable from /proc/cpuinfo: ASSUMED_FMA_UNITS_PER_CORE is
an assumption (2, as on the server CPUs this project has run on: Xeons with AVX-512, AMD
EPYCs of Zen 3 with AVX2 and of Zen 4/5 with AVX-512) and is reported as one. A measured
SGEMM checks it: on the Zen 3 EPYC (2 cores, AVX2, 2445 MHz) the formula gives 156.5
GFLOP/s and Paddle's SGEMM ran at 153. The clock is lscpu's "CPU max MHz" where it gives one, else /proc/cpuinfo's
"cpu MHz" (a virtual machine's nominal clock; turbo may run faster), raised to what a
measured SGEMM's rate needs where that is more (see cpu_peak).

Achieved GFLOP/s = 2 x MACs of one image's forward pass x images/s - for training too
(a training step does roughly 3x a forward pass's work, so training's figure understates
the arithmetic done by about that factor; it is comparable between backends).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

from mbv2.runtime import cpu_flags

ASSUMED_FMA_UNITS_PER_CORE = 2


def fp32_lanes(flags: set[str]) -> int:
    """FP32 values one FMA instruction works on: 16 (AVX-512), 8 (AVX2), 4 (SSE)."""
    return 16 if "avx512f" in flags else 8 if "avx2" in flags else 4


def fp32_peak_gflops(cores: int, lanes: int, fma_units: int, mhz: float) -> float:
    return cores * lanes * fma_units * 2 * mhz / 1000.0


def achieved_gflops(macs_per_image: int, img_s: float) -> float:
    return 2 * macs_per_image * img_s / 1e9


def _clock_mhz() -> tuple[float | None, float | None]:
    """(/proc/cpuinfo's cpu MHz, lscpu's CPU max MHz), None where not given."""
    cur = mx = None
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("cpu MHz"):
                    cur = float(line.split(":", 1)[1])
                    break
    except (OSError, ValueError):
        pass
    if shutil.which("lscpu"):
        try:
            out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
            for line in out.splitlines():
                if line.startswith("CPU max MHz"):
                    mx = float(line.split(":", 1)[1])
        except (OSError, ValueError, subprocess.SubprocessError):
            pass
    return cur, mx


def cpu_peak(threads: int, sgemm_gflops: float | None = None) -> dict[str, Any]:
    """This CPU's FP32 peak for `threads` cores, every input and how it was computed.

    `sgemm_gflops`, a measured FP32 matrix product's rate, bounds the peak from below: a
    virtual machine's /proc/cpuinfo gives its nominal clock, and a CPU running faster
    (turbo) has a higher peak than that clock says (seen here: 2596 MHz reported, 490
    GFLOP/s measured on 2 cores, which needs at least 3.8 GHz). Where the product
    implies a faster clock than the one read, that clock is used and the formula says so."""
    flags = cpu_flags()
    cur, mx = _clock_mhz()
    cores = max(1, min(threads, os.cpu_count() or threads))
    lanes = fp32_lanes(flags)
    fma = ASSUMED_FMA_UNITS_PER_CORE
    read = mx or cur
    clock_src = "lscpu CPU max MHz" if mx else "/proc/cpuinfo cpu MHz" if cur else "unknown"
    mhz = read
    implied = sgemm_gflops * 1000.0 / (cores * lanes * fma * 2) if sgemm_gflops else None
    if implied and (not read or implied > read):
        mhz = round(implied, 1)
        clock_src = (f"at least, for the measured SGEMM's {sgemm_gflops:.0f} GFLOP/s; "
                     f"{clock_src} says {read}" if read else "the measured SGEMM")
    peak = fp32_peak_gflops(cores, lanes, fma, mhz) if mhz else None
    return {
        "cores_used": cores, "fp32_lanes_per_fma": lanes, "fma_units_per_core": fma,
        "clock_mhz": mhz, "clock_source": clock_src, "cpuinfo_mhz": cur, "lscpu_max_mhz": mx,
        "sgemm_gflop_s": round(sgemm_gflops, 1) if sgemm_gflops else None,
        "peak_gflop_s": round(peak, 1) if peak else None,
        "assumption": (f"{fma} FMA units per core (as on Xeon and EPYC server cores); not "
                       "read from the CPU"),
        "formula": (f"{cores} cores x {lanes} FP32 lanes/FMA x {fma} FMA units/core (assumed) "
                    f"x 2 flop/FMA x {mhz} MHz ({clock_src}) = {peak:.1f} GFLOP/s"
                    + (f"; Paddle's SGEMM 2048^3 measured {sgemm_gflops:.0f} GFLOP/s"
                       if sgemm_gflops else "") if peak else "clock unknown: no peak"),
        "achieved": "2 x forward MACs/image x img/s (training too: ~1/3 of its arithmetic)",
    }
