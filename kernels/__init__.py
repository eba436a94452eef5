"""Triton kernels of pyengine, shipped inside the package as ``pyengine.kernels``.

Import them only through ``pyengine.ops``; set TRITON_INTERPRET=1 before the first import to
run them on a CPU (tests do).
"""
