"""Shared machinery of the block-structured CNN families (ConvNeXt, EfficientNet /
MobileNetV3, RegNet): their spec type (:mod:`.spec`), gated/compact block twins and the
generic gate/spec/apply/compile (:mod:`.family`), slicing (:mod:`.slicing`), cost
(:mod:`.cost`), the solver ledger, expected MACs and HiAP projection (:mod:`.ledger`),
importance units (:mod:`.importance`) and the adapter base (:mod:`.adapter`)."""
