"""`python -m mbv2.bench` (see mbv2.bench); also each worker process it starts."""
from mbv2.bench.driver import main

main()
