"""mbv2: an experiment runner for MobileNetV2 classifiers on PaddlePaddle."""
import os as _os
import warnings as _warnings

from mbv2 import runtime as _runtime  # imports neither paddle nor numpy

# Paddle's bundled MKL takes a slow generic code path on AMD CPUs unless this names the
# AVX2 or AVX-512 path before the library loads (mbv2.runtime.mkl_cpu_type; measured: 1.6-
# 2.2x faster training steps with the AVX2 path, 10-20 % more with AVX-512 where the CPU
# has it). Intel CPUs ignore it. setdefault keeps a user's own choice.
_mkl_type = _runtime.mkl_cpu_type()
if _mkl_type:
    _os.environ.setdefault("MKL_DEBUG_CPU_TYPE", _mkl_type)

# Freed tensors stay in the heap instead of being unmapped and faulted in again every
# training step (mbv2.runtime.configure_malloc: 1.6x at 224 px here); MBV2_MALLOC=system
# opts out.
_runtime.configure_malloc()

# Noise Paddle prints on every import / training step that says nothing about the run.
_warnings.filterwarnings("ignore", message="No ccache found")
_warnings.filterwarnings("ignore", message="When training, we now always track global mean")
_warnings.filterwarnings("ignore", message="To copy construct from a tensor")

__version__ = "0.1.0"
