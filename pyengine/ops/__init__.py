"""The three hot ops of pyengine, each with a torch reference and pluggable backends.

Every op takes ``backend="auto"|"torch"|"triton"|"cuda"|"cpu"``; "auto" picks the fastest
backend that is available and correct for the inputs' device, and the torch reference is the
ground truth the tests compare every backend against.
"""
from pyengine.ops.masked_ffn import masked_ffn, masked_ffn_reference
from pyengine.ops.varlen_attention import varlen_attention, varlen_attention_reference

from pyengine.ops.importance import (importance_reduce, importance_reduce_many,
                         importance_reduce_many_reference, importance_reduce_reference)

__all__ = ["varlen_attention", "varlen_attention_reference", "masked_ffn",
           "masked_ffn_reference", "importance_reduce", "importance_reduce_reference",
           "importance_reduce_many", "importance_reduce_many_reference"]
