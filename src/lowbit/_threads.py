"""`single_thread`: run loops of many small tensor ops on one CPU thread."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def single_thread(device: torch.device, small: bool = True):
    """Run many small ops on one CPU thread (when `small`).

    Small ops gain nothing from intra-op threads, but each parallel region can stall for a
    scheduler slice when the cores are busy (measured: 8 ms instead of 10 us for one searchsorted;
    GPTQ of a 576 x 576 layer: 14.8 s on 2 busy threads vs 1.05 s on one). torch's thread count is
    process-wide; it is restored on exit.

    Example:
        >>> import torch
        >>> with single_thread(torch.device("cpu")):
        ...     torch.get_num_threads()
        1
    """
    n = torch.get_num_threads()
    if device.type != "cpu" or n == 1 or not small:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
