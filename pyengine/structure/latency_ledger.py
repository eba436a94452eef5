"""A family's solver ledger priced in predicted milliseconds instead of MACs (the base of the
ViT's ``solver._LatencyLedger`` and the CNNs' ``cost.cnn_latency.CnnLatencyLedger``).

Removing units one chunk at a time by score overshoots a latency budget: a block's ms barely
moves with its width (fixed per-layer costs), so the global ranking strips many units before a
whole branch goes and the budget is met. The ledger remembers what each removal took, and
:meth:`LatencyLedger.refill` gives chunks back, the last removed (highest score) first,
wherever the structure stays within the budget.

A subclass says how to price a block (``block_macs``, the strategies' name for a block's
cost), how many there are (``n_blocks``), and how to read and write one block's kept state
(``get_state``: a tuple of kept index lists, None for a removed block; ``set_state``);
``valid`` may refuse a state (a ViT head with q/k dims but no v dims).
"""
from __future__ import annotations


class LatencyLedger:
    unit = "ms"

    def __init__(self, ledger, latency):
        self._ledger, self._lat = ledger, latency
        self.dense = latency.dense
        # (block, units taken per kept list, whether the whole block went)
        self._removed: list[tuple[int, tuple, bool]] = []

    def __getattr__(self, name):
        return getattr(self._ledger, name)

    # ---- what a family says
    def block_macs(self, l: int) -> float:
        raise NotImplementedError

    def n_blocks(self) -> int:
        raise NotImplementedError

    def get_state(self, l: int) -> tuple | None:
        raise NotImplementedError

    def set_state(self, l: int, state: tuple | None) -> None:
        raise NotImplementedError

    def valid(self, l: int, state: tuple) -> bool:
        return True

    # ---- the strategies' interface
    def total(self) -> float:
        return self._lat.fixed + sum(self.block_macs(l) for l in range(self.n_blocks()))

    def remove(self, payload):
        before = self.get_state(self._ledger.block_of(payload))
        l = self._ledger.remove(payload)
        if l is not None:
            after = self.get_state(l)
            taken = before if after is None else tuple(
                tuple(sorted(set(b) - set(a))) for b, a in zip(before, after))
            self._removed.append((l, taken, after is None))
        return l

    def refill(self, budget: float) -> None:
        """Give removed chunks back, the last removed (highest score) first, wherever the
        structure stays within ``budget``; a chunk of a block (or head) that is gone now stays
        out, and a block that went whole comes back as it was then."""
        cur = self.total()
        for l, taken, went in reversed(self._removed):
            now = self.get_state(l)
            if (now is None) != went:  # gone since, or back already
                continue
            new = taken if went else tuple(tuple(sorted(set(n) | set(t)))
                                           for n, t in zip(now, taken))
            if not self.valid(l, new):
                continue
            old_ms = self.block_macs(l)
            self.set_state(l, new)
            new_ms = self.block_macs(l)
            if cur - old_ms + new_ms <= budget:
                cur += new_ms - old_ms
            else:
                self.set_state(l, now)
