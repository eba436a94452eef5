"""Device peaks (compute and memory bandwidth) for the roofline: vendor data sheets, by name.

    peaks_for("h100")            # NVIDIA H100 SXM: 989 TFLOP/s bf16, 3.35 TB/s
    peaks_for("cuda")            # the visible GPU, matched by its name
    PEAKS["h200"].source         # where the figures come from

Every figure is the dense one (the data sheets also print "with sparsity" figures, twice as
high, for 2:4 sparse matrices, which pyengine does not use). These are the vendor's upper
bounds; ``pyengine profile`` measures its own roof on the device it runs on and takes these only
with ``--peaks <key>``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Mapping

import torch

from pyengine.cost.dtypes import as_dtype, dtype_name

__all__ = ["Peaks", "PEAKS", "peaks_for"]


@dataclass(frozen=True)
class Peaks:
    """Peak compute and memory bandwidth of a device (dense, no sparsity).

    ``flops_per_s`` is the default (bf16 tensor-core for GPUs); ``flops_by_dtype`` refines it
    per dtype name ("bfloat16", "float16", "float32", "tf32", "float8").
    """

    name: str
    flops_per_s: float
    bytes_per_s: float
    flops_by_dtype: Mapping[str, float] = field(default_factory=dict, compare=False, hash=False)
    source: str = field(default="", compare=False)   # where the figures come from

    def flops_for(self, dtype: torch.dtype | str | None = None) -> float:
        """Peak FLOP/s for matmuls at ``dtype``. float32 counts as TF32 when PyTorch is
        allowed to use it (``torch.get_float32_matmul_precision() != "highest"``)."""
        if dtype is None or not self.flops_by_dtype:
            return self.flops_per_s
        if isinstance(dtype, str) and dtype in ("tf32", "float8"):
            return float(self.flops_by_dtype.get(dtype, self.flops_per_s))
        key = dtype_name(as_dtype(dtype))
        if key == "float32" and torch.get_float32_matmul_precision() != "highest" \
                and "tf32" in self.flops_by_dtype:
            key = "tf32"
        return float(self.flops_by_dtype.get(key, self.flops_per_s))

    def ridge(self, dtype: torch.dtype | str | None = None) -> float:
        """Arithmetic intensity (FLOP/byte) where the compute and memory roofs meet."""
        return self.flops_for(dtype) / self.bytes_per_s


_H100_SXM = {"bfloat16": 989e12, "float16": 989e12, "float8": 1979e12, "tf32": 495e12,
             "float32": 67e12}
_H100_SHEET = ("NVIDIA H100 Tensor Core GPU data sheet (nvidia.com/en-us/data-center/h100), "
               "dense figures (half the 'with sparsity' ones)")
_H200_SHEET = ("NVIDIA H200 Tensor Core GPU data sheet (nvidia.com/en-us/data-center/h200): "
               "H100 SXM compute, 4.8 TB/s HBM3e; dense figures")
_A100_SHEET = ("NVIDIA A100 Tensor Core GPU data sheet (nvidia-a100-datasheet-us-nvidia-1758950"
               "-r4-web.pdf): 312 TFLOP/s bf16/fp16 dense, 156 tf32, 19.5 fp32; 80GB SXM 2,039 "
               "GB/s, 40GB 1,555 GB/s")

#: Known devices (vendor data sheets, dense figures). Keys are what ``device="..."`` and
#: ``pyengine profile --peaks`` accept; ``Peaks.source`` says which sheet.
PEAKS: dict[str, Peaks] = {
    "h100-sxm": Peaks("NVIDIA H100 SXM", 989e12, 3.35e12, _H100_SXM, _H100_SHEET),
    "h100-pcie": Peaks("NVIDIA H100 PCIe", 756e12, 2.0e12,
                       {"bfloat16": 756e12, "float16": 756e12, "float8": 1513e12,
                        "tf32": 378e12, "float32": 51e12}, _H100_SHEET),
    "h100-nvl": Peaks("NVIDIA H100 NVL", 835e12, 3.9e12,
                      {"bfloat16": 835e12, "float16": 835e12, "float8": 1671e12,
                       "tf32": 418e12, "float32": 60e12}, _H100_SHEET),
    "h200": Peaks("NVIDIA H200", 989e12, 4.8e12, _H100_SXM, _H200_SHEET),
    "a100": Peaks("NVIDIA A100 SXM 80GB", 312e12, 2.039e12,
                  {"bfloat16": 312e12, "float16": 312e12, "tf32": 156e12, "float32": 19.5e12},
                  _A100_SHEET),
    "a100-40gb": Peaks("NVIDIA A100 SXM 40GB", 312e12, 1.555e12,
                       {"bfloat16": 312e12, "float16": 312e12, "tf32": 156e12,
                        "float32": 19.5e12}, _A100_SHEET),
    "cpu": Peaks("generic CPU (rough default: 2 cores x AVX2 FMA ~1e11 FLOP/s, ~2e10 B/s)",
                 1e11, 2e10, source="a rough guess, not a data sheet: measure the CPU instead "
                 "(pyengine profile does)"),
}
_ALIASES = {"h100": "h100-sxm", "h100 sxm": "h100-sxm", "h100-sxm5": "h100-sxm",
            "h100 pcie": "h100-pcie", "h100 nvl": "h100-nvl", "a100-sxm": "a100",
            "a100 sxm": "a100", "a100-80gb": "a100", "a100-sxm-40gb": "a100-40gb"}


def _match_device_name(name: str) -> str | None:
    n = name.lower().strip()
    if n in PEAKS:
        return n
    if n in _ALIASES:
        return _ALIASES[n]
    if "h200" in n:
        return "h200"
    if "h100" in n:
        if "pcie" in n:
            return "h100-pcie"
        if "nvl" in n:
            return "h100-nvl"
        return "h100-sxm"
    if "a100" in n:
        return "a100-40gb" if "40gb" in n.replace(" ", "") else "a100"
    if n == "cpu":
        return "cpu"
    return None


def peaks_for(device: Peaks | str | torch.device | None = None) -> Peaks:
    """Resolve ``device`` to :class:`Peaks`.

    ``None``: the current CUDA device (matched by its name) if CUDA is available, else the
    rough CPU default. A string is a key of :data:`PEAKS` ("h100", "h200", "a100", "cpu", ...),
    a CUDA device name ("NVIDIA H100 80GB HBM3"), or "cuda"/"cuda:N". A :class:`Peaks` is used
    as is.
    """
    if isinstance(device, Peaks):
        return device
    if isinstance(device, torch.device):
        device = str(device)
    if device is None:
        if torch.cuda.is_available():
            device = "cuda"
        else:
            return PEAKS["cpu"]
    if not isinstance(device, str):
        raise TypeError(f"device must be None, a name, a torch.device or a Peaks, got {device!r}")
    if device.lower().startswith("cuda"):
        gpu = torch.cuda.get_device_name(torch.device(device)) if torch.cuda.is_available() else ""
        key = _match_device_name(gpu) if gpu else None
        if key is None:
            warnings.warn(f"no peak figures for GPU {gpu or '(none visible)'!r}; using H100 SXM "
                          "figures. Pass device=pyengine.cost.Peaks(...) for exact ones.")
            p = PEAKS["h100-sxm"]
            return Peaks(f"{gpu or 'unknown GPU'} (assumed H100 SXM peaks)", p.flops_per_s,
                         p.bytes_per_s, p.flops_by_dtype)
        return PEAKS[key]
    key = _match_device_name(device)
    if key is None:
        raise ValueError(f"unknown device {device!r}; known: {sorted(PEAKS)} (or pass "
                         "pyengine.cost.Peaks(name, flops_per_s, bytes_per_s))")
    return PEAKS[key]

