"""The three hot ops of pyengine, each with a torch reference and pluggable backends.

Every op takes ``backend="auto"|"torch"|"triton"|"cuda"|"cpu"``; "auto" runs the first backend
of the op's priority list for the inputs' device that supports the inputs, and the torch
reference is the ground truth the tests compare every backend against.

Where things live:

* ``<op>/`` (varlen_attention, masked_ffn, importance_reduce): the public function
  (``__init__.py``), the torch reference (``reference.py``), one class per backend
  (``backends.py``) and the torch.library registrations (``library.py``).
* ``dispatch.py``: the Backend base class, the one dispatch rule, BackendNotAvailable,
  available_backends() and describe(); ``priority.py``: what "auto" tries, per op and device.
* ``bases.py``: the torch / Triton / csrc backend kinds and their availability checks;
  ``_ext.py``: the lazy loader of the compiled extension pyengine._C (csrc/).
* The Triton kernels are the top-level kernels/ folder, shipped as ``pyengine.kernels``.

Adding a backend: a class in ``<op>/backends.py`` (a base from bases.py plus the op's input
class; ``name``, ``supported_devices``, ``supported_dtypes``, ``supports_autograd``, ``run``),
listed in that file's ``BACKENDS``; "auto" uses it once ``priority.py`` names it.
"""
from pyengine.ops.dispatch import (BACKENDS, BackendNotAvailable, available_backends, describe,
                                   supported_backends)
# (in this order, so that describe() lists them so)
from pyengine.ops.varlen_attention import varlen_attention, varlen_attention_reference
from pyengine.ops.masked_ffn import masked_ffn, masked_ffn_reference
from pyengine.ops.importance_reduce import (importance_reduce, importance_reduce_many,
                                            importance_reduce_many_reference,
                                            importance_reduce_reference)

__all__ = ["varlen_attention", "varlen_attention_reference", "masked_ffn",
           "masked_ffn_reference", "importance_reduce", "importance_reduce_reference",
           "importance_reduce_many", "importance_reduce_many_reference", "BACKENDS",
           "BackendNotAvailable", "available_backends", "supported_backends", "describe"]
