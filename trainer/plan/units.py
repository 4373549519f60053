"""Byte counts as people read them."""

GIB = 2**30
MIB = 2**20


def human_bytes(n: int) -> str:
    """GiB above one GiB, else MiB (binary units, as nvidia-smi and torch report memory)."""
    if abs(n) >= GIB:
        return f"{n / GIB:.2f} GiB"
    return f"{n / MIB:.1f} MiB"
