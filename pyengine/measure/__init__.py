"""Measuring: the one timing harness (timing), end-to-end latency of dense / compact / padded /
Torch-Pruning variants (bench), the per-layer roofline profile (roofline), the peers
(baselines)."""
