"""A device argument checked before any work: a clear error for a name torch does not know or
a GPU that is not there (instead of a traceback from deep inside the first .to())."""
from __future__ import annotations

import torch

from pyengine.errors import SettingError

__all__ = ["check_device"]


def check_device(device: str | torch.device, setting: str = "device") -> torch.device:
    """``device`` as a torch.device that this machine has; else a SettingError."""
    def bad(text):
        raise SettingError(setting, f"{setting} {device!r}: {text}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        bad("not a device; use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            bad("torch sees no CUDA GPU on this machine (torch.cuda.is_available() is False); "
                "use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            bad(f"this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            bad("torch sees no MPS device on this machine")
    elif dev.type != "cpu":
        bad("pyengine runs on cpu or cuda devices")
    return dev
