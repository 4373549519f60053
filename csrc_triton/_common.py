"""Launch-configuration helpers shared by the kernels of this package."""

import torch


def num_warps_for(block: int) -> int:
    # Enough threads that each keeps a few dozen elements of a row block in registers: fewer
    # warps spill on wide rows, more waste threads on narrow ones.
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def persistent_programs(device: torch.device, work_items: int) -> int:
    """How many programs a kernel that loops over rows (and keeps per-program partial sums) launches."""
    if device.type == "cuda":
        # Two programs per SM hide each other's load latency; more would only grow the partial-sum
        # buffer that is reduced afterwards.
        count = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        # The interpreter runs programs one after another: a few are enough to exercise the
        # per-program row loops and the reduction of partial sums.
        count = 4
    return max(1, min(work_items, count))
