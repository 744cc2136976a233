"""Custom CPU operators for mbv2 (JIT-built Paddle C++ extensions), see `depthwise`."""
