"""mbv2: an experiment runner for MobileNetV2 classifiers on PaddlePaddle.

Importing mbv2 (or any of its modules) changes nothing in the process: the entry points
(`mbv2.run`, `mbv2.eval`, `mbv2.export`, `mbv2.predict`, `mbv2.bench`) call
`mbv2.runtime.configure_process()` first, which picks MKL's code path, keeps freed memory
in the heap and quiets Paddle's noise. A program that imports mbv2 as a library calls it
itself, before it imports paddle, to get the same speed.
"""

__version__ = "0.1.0"
