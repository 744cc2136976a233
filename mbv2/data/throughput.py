"""How fast a paddle DataLoader delivers a data set's images (`measure_loader`)."""
from __future__ import annotations

import time
from typing import Literal

import numpy as np
from omegaconf import DictConfig
from paddle.io import DataLoader, Subset

from mbv2.data.datasets import DataBundle
from mbv2.data.errors import DataError
from mbv2.data.sources import build_data


def measure_loader(data: DataBundle | DictConfig, batch_size: int = 64, num_workers: int = 0,
                   batches: int = 20, split: Literal["train", "val"] = "train") -> float:
    """Images per second a paddle DataLoader delivers (decode + transform + collate), the
    number to set beside training img/s: when it is lower, training waits for data.
    Worker start-up and the first batch are left out of the timing."""
    if isinstance(data, DictConfig):  # the `data` config, or a whole run config
        bundle = build_data(data.data if "data" in data else data)
    else:
        bundle = data
    dataset = bundle.train if split == "train" else bundle.val
    # One whole pass over a subset of the right size: a loader abandoned mid-epoch leaves
    # its workers prefetching files the caller may already be deleting.
    wanted = (batches + 1) * batch_size
    if len(dataset) < 2 * batch_size:
        raise DataError(f"measure_loader: {len(dataset)} images do not fill two batches of {batch_size}")
    indices = np.random.default_rng(0).permutation(len(dataset))[:wanted].tolist()
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False,
                        drop_last=True, num_workers=num_workers, return_list=True)
    images, started = 0, None
    for x, _ in loader:
        if started is None:  # worker start-up and the first batch are not timed
            started = time.perf_counter()
            continue
        images += int(x.shape[0])
    return images / (time.perf_counter() - started)
