"""Experiments built on the engine: the demo, criteria sweeps, hybrid routing, the pruning
limit."""
