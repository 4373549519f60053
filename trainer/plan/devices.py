"""The devices the planner knows, their memory, and the memory a run needs beyond its tensors.

GPU capacities are what NVML reports (nvidia-smi's "Total"), as tabulated by Modal
(https://thundergolfer.com/blog/nvidia-gpu-memory-capacity): H200 143,771 MiB, H100 80GB 81,559 MiB,
A100 80GB 81,920 MiB, A100 40GB 40,960 MiB, L4 23,034 MiB. That table has no RTX 4090; its entry
is the 24 GiB of GDDR6X in NVIDIA's specification, which the driver reports slightly below.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from trainer.errors import ConfigError

MIB = 2**20
GIB = 2**30


@dataclass(frozen=True)
class Device:
    name: str
    kind: str  # "cpu" or "cuda"
    memory_bytes: int
    arch: int = 0  # CUDA compute capability major (9: Hopper, 8: Ampere/Ada)


GPUS = {
    "h100-80gb": Device("h100-80gb", "cuda", 81_559 * MIB, 9),
    "h200-141gb": Device("h200-141gb", "cuda", 143_771 * MIB, 9),
    "a100-80gb": Device("a100-80gb", "cuda", 81_920 * MIB, 8),
    "a100-40gb": Device("a100-40gb", "cuda", 40_960 * MIB, 8),
    "l4-24gb": Device("l4-24gb", "cuda", 23_034 * MIB, 8),
    "rtx4090-24gb": Device("rtx4090-24gb", "cuda", 24 * GIB, 8),
}
DEVICE_NAMES = (*GPUS, "cpu")

# Device memory a CUDA process uses outside PyTorch's allocator (so outside max_memory_allocated):
# the CUDA context and the kernels' modules. pytorch/pytorch#34323 measured 781 MB (nvidia-smi, MiB)
# for a process that only initialised CUDA; lazy module loading (CUDA >= 11.7) makes it smaller,
# so this is a conservative figure.
CUDA_CONTEXT_BYTES = 781 * MIB

# A CPU run's process also holds the interpreter and torch's libraries, which are not tensors:
# 271 MiB resident after importing torch 2.13 and the trainer (measured, ru_maxrss, on the CPU build).
CPU_RUNTIME_BYTES = 271 * MIB

# A CPU run's resident memory (RSS) beyond that runtime, fitted to its measured growth from before
# the Trainer is built to the end of its 4th step (VmHWM - VmRSS; benchmarks/bench_rss.py, which
# prints the fit and each case, docs/memory.md the table): what the modules imported and the
# objects made while the run is built take; the tensors' peak; a share of every byte the step
# allocates, which glibc's heap keeps (freed blocks below its mmap threshold, which rises to 32 MiB
# with the first large free, stay in the heap, fragmented, instead of going back to the system);
# and the libraries an 8-bit optimizer or nf4 base imports (bitsandbytes). Leave-one-out over the
# 17 cases the largest error was 10%; measured again, the 17 were within 10% of these constants.
RSS_BUILD_BYTES = 129 * MIB
RSS_PEAK_FACTOR = 0.92
RSS_CHURN_FACTOR = 0.161
RSS_BITSANDBYTES_BYTES = 55 * MIB


def cpu_rss_bytes(peak_bytes: int, allocated_bytes: int, bitsandbytes: bool) -> int:
    """The predicted peak resident memory of a CPU training process: the runtime, the run's build,
    the tensors' peak, the heap's share of the step's allocations, bitsandbytes' libraries."""
    return (
        CPU_RUNTIME_BYTES
        + RSS_BUILD_BYTES
        + int(RSS_PEAK_FACTOR * peak_bytes)
        + int(RSS_CHURN_FACTOR * allocated_bytes)
        + (RSS_BITSANDBYTES_BYTES if bitsandbytes else 0)
    )


# The caching allocator holds freed blocks for reuse and rounds sizes up (to 512 bytes, large
# blocks to 2 MiB segments), so the memory it reserves exceeds its allocated peak. PyTorch
# documents when fragmentation happens but gives no typical size; this 5 % margin is our
# assumption, to be replaced by max_memory_reserved / max_memory_allocated measured on a GPU
# (benchmarks/bench_plan.py --device cuda records both).
ALLOCATOR_SLACK = 0.05


def allocator_slack(peak_bytes: int) -> int:
    return int(peak_bytes * ALLOCATOR_SLACK)


def peak_within(budget: int, kind: str) -> int:
    """The largest allocator peak whose need (Plan.required_bytes: the peak plus the overheads
    above) is within `budget` bytes on a device of `kind` ("cuda" or "cpu")."""
    if kind == "cuda":
        return int((budget - CUDA_CONTEXT_BYTES) / (1 + ALLOCATOR_SLACK))
    return budget - CPU_RUNTIME_BYTES


def library_workspace_bytes(device_name: str) -> int:
    """cuBLAS and cuBLASLt workspaces, which PyTorch allocates through its caching allocator (pytorch#83461).

    cuBLAS: the default CUBLAS_WORKSPACE_CONFIG ":4096:2:16:8", 4096 KiB x 2 + 16 KiB x 8. cuBLASLt:
    32 MiB on Hopper and later, 4 MiB on Ampere/Ada cards of 24 GiB or more, 1 MiB otherwise
    (pytorch#120925, after NVIDIA's recommended sizes).
    """
    cublas = 4096 * 1024 * 2 + 16 * 1024 * 8
    device = GPUS.get(device_name)
    arch = device.arch if device else 9
    memory = device.memory_bytes if device else 80 * GIB
    lt = 32 * MIB if arch >= 9 else 4 * MIB if memory >= 24 * GIB - 256 * MIB else MIB
    return cublas + lt


def cpu_memory_bytes() -> int:
    """This machine's RAM."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def unknown_device(name: str) -> ConfigError:
    return ConfigError(
        f"plan.device={name!r} is not a device the planner knows; choose one of: "
        f"{', '.join(DEVICE_NAMES)}, or auto (the training device), or give the memory with "
        "--plan.budget=BYTES"
    )


def resolve_device(config, name: str | None = None) -> Device:
    """plan.device (or `name`): a table entry, `cpu` (this machine's RAM), or `auto`: the device
    train.device will train on (the GPU present, else the CPU)."""
    name = name or config.plan.device
    if name == "cpu":
        return Device("cpu", "cpu", cpu_memory_bytes())
    if name in GPUS:
        return GPUS[name]
    if name != "auto":
        raise unknown_device(name)
    import torch

    wanted = config.train.device
    if wanted != "cpu" and torch.cuda.is_available():
        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return Device(props.name, "cuda", props.total_memory, props.major)
    return Device("cpu", "cpu", cpu_memory_bytes())


def budget_bytes(config, device: Device) -> int:
    """The memory a run may use: plan.budget, else train.memory_budget, else the device's memory."""
    for key, value in (("plan.budget", config.plan.budget), ("train.memory_budget", config.train.memory_budget)):
        if value < 0:
            raise ConfigError(f"{key} must be >= 0 bytes (0: the device's memory), got {value}")
        if value:
            return value
    return device.memory_bytes
