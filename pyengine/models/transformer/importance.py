"""The importance units of a gated EVA / BEiT / Swin block, for the criteria of
:mod:`pyengine.methods.criteria` (in the vocabulary of :mod:`pyengine.models.importance`).

A block with H heads of Dh dims (q, k, v rows of the fused ``qkv`` at offsets 0, H*Dh,
2*H*Dh, or the separate ``q_proj``/``k_proj``/``v_proj``; the q and v biases of EVA/BEiT are
rows of their own vectors) and an FFN of M neurons:

* q/k unit (h, i): the q and k rows of its dims (a rotary pair: both dims), the q bias there;
  features q and k there (``qkv_tap``: q|k|v after the biases).
* v dim (h, d): its v row (and bias) and proj column; feature v there.
* head h: all its q/k and v dims. (Its column of a relative-position table follows it into
  the compact model but does not count toward its score.)
* neuron j: fc1 row j (a gated FFN: its gate and value rows) and fc2 column j; feature = the
  activation fc2 reads.
* attention / FFN branch: every weight and bias of the branch; feature = the branch output.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pyengine.models.importance import Branch, Group, Hook, LayerView, Part

__all__ = ["UnitScores", "TransformerUnits"]


@dataclass
class UnitScores:
    """Scores of one block (float64, CPU; higher = more important). ``qk`` is per q/k unit
    ([H, U]; None when q/k dims are fixed by q/k norm)."""

    head: torch.Tensor
    qk: torch.Tensor | None
    v: torch.Tensor
    neuron: torch.Tensor
    attn: float
    mlp: float


class TransformerUnits:
    """The importance units of every block of a gated EVA / BEiT / Swin model."""

    def __init__(self, pairs, g):
        self.blocks = pairs
        self.shapes = g.shapes()

    def hooks(self, i: int) -> list[Hook]:
        a, m = self.blocks[i]
        fc1 = m.fc1_g if m.kind == "swiglu" else m.fc1
        return [Hook("attn_in", a, "input"), Hook("qkv_out", a.qkv_tap, "output"),
                Hook("proj_in", a.proj, "input"), Hook("attn_out", a, "output"),
                Hook("mlp_in", fc1, "input"), Hook("hidden", m.fc2, "input"),
                Hook("mlp_out", m, "output")]

    def layers(self, i: int) -> dict[str, LayerView]:
        a, m = self.blocks[i]
        out = {}
        if a.qkv is not None:
            out["qkv"] = LayerView(a.qkv.weight, [a.qkv.bias], "attn_in")
        else:
            for w in ("q", "k", "v"):
                lin = getattr(a, f"{w}_proj")
                out[w] = LayerView(lin.weight, [lin.bias], "attn_in")
        if a.q_bias is not None:
            out["q_bias"] = LayerView(None, [a.q_bias])
            out["v_bias"] = LayerView(None, [a.v_bias])
        out["proj"] = LayerView(a.proj.weight, [a.proj.bias], "proj_in")
        if m.kind == "swiglu":
            out["fc1_g"] = LayerView(m.fc1_g.weight, [m.fc1_g.bias], "mlp_in")
            out["fc1_x"] = LayerView(m.fc1_x.weight, [m.fc1_x.bias], "mlp_in")
        else:
            out["fc1"] = LayerView(m.fc1.weight, [m.fc1.bias], "mlp_in")
        out["fc2"] = LayerView(m.fc2.weight, [m.fc2.bias], "hidden")
        return out

    def _rows(self, i: int, which: str, idx: torch.Tensor) -> list[Part]:
        """Weight parts of q/k/v rows ``idx`` (indices within q, k or v: h * Dh + d)."""
        a, _ = self.blocks[i]
        sh = self.shapes[i]
        off = {"q": 0, "k": 1, "v": 2}[which] * sh.heads * sh.head_dim
        parts = ([Part("qkv", "row", idx + off)] if a.qkv is not None
                 else [Part(which, "row", idx)])
        if a.q_bias is not None and which in ("q", "v"):
            parts.append(Part(f"{which}_bias", "row", idx))
        return parts

    def groups(self, i: int) -> list[Group | Branch]:
        """In the order the random criterion draws them: head, qk, v, neuron, attn, mlp."""
        _, m = self.blocks[i]
        sh = self.shapes[i]
        H, Dh, M = sh.heads, sh.head_dim, sh.hidden
        HD = H * Dh
        hd = torch.arange(HD).view(H, Dh)
        feat = lambda idx, w: Part("qkv_out", "feature", idx + {"q": 0, "k": HD, "v": 2 * HD}[w])  # noqa: E731
        out: list[Group | Branch] = [Group(
            "head", (H,),
            self._rows(i, "q", hd) + self._rows(i, "k", hd) + self._rows(i, "v", hd)
            + [Part("proj", "col", hd)],
            [feat(hd, "q"), feat(hd, "k"), feat(hd, "v")])]
        if not sh.qk_fixed:
            U = sh.qk_units
            dims = torch.tensor([sh.unit_dims(u) for u in range(U)], dtype=torch.long)  # [U, u]
            unit = torch.arange(H)[:, None, None] * Dh + dims[None]                    # [H, U, u]
            out.append(Group("qk", (H, U), self._rows(i, "q", unit) + self._rows(i, "k", unit),
                             [feat(unit, "q"), feat(unit, "k")]))
        out.append(Group("v", (H, Dh), self._rows(i, "v", hd[..., None])
                         + [Part("proj", "col", hd[..., None])], [feat(hd[..., None], "v")]))
        n = torch.arange(M)[:, None]
        if m.kind == "swiglu":
            fc1 = [Part("fc1_g", "row", n), Part("fc1_x", "row", n)]
        elif m.kind == "glu":
            fc1 = [Part("fc1", "row", torch.cat([n, n + M], dim=1))]
        else:
            fc1 = [Part("fc1", "row", n)]
        out.append(Group("neuron", (M,), fc1 + [Part("fc2", "col", n)],
                         [Part("hidden", "feature", n)]))
        attn_layers = tuple(k for k in self.layers(i) if k in ("qkv", "q", "k", "v", "q_bias",
                                                               "v_bias", "proj"))
        mlp_layers = tuple(k for k in self.layers(i) if k.startswith("fc"))
        out += [Branch("attn", attn_layers, "attn_out"), Branch("mlp", mlp_layers, "mlp_out")]
        return out

    def assemble(self, i: int, values: dict) -> UnitScores:
        return UnitScores(values["head"], values.get("qk"), values["v"], values["neuron"],
                          float(values["attn"]), float(values["mlp"]))
