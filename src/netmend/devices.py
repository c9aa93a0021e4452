"""Which torch devices this machine has, checked before any work starts (the CLI's --device, a bench grid's device)."""
from __future__ import annotations

from .errors import NetmendError


def available_devices() -> list[str]:
    """The torch devices this machine has: cpu, each CUDA device, mps."""
    import torch

    out = ["cpu"]
    if torch.cuda.is_available():
        out += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out


def check_device(device: str, what: str = "--device") -> str:
    """`device` names a device this machine has: else one line (naming `what` asked for it) listing those it has."""
    import torch

    have = available_devices()
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise NetmendError(f"{what} {device!r} is not a device name; this machine has: {', '.join(have)}") from None
    ok = (d.type == "cpu" or (d.type == "cuda" and "cuda" in have and (d.index or 0) < torch.cuda.device_count())
          or (d.type == "mps" and "mps" in have))
    if not ok:
        raise NetmendError(f"{what} {device} is not available here; this machine has: {', '.join(have)}")
    return device
