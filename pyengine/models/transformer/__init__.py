"""What the transformer families beyond the plain ViT (EVA/EVA02, BEiT, Swin) share: the
per-block shape a spec is checked against (:class:`~.spec.BlockShape`), their spec type, gated
and compact attention/FFN modules, MAC formulas and cost rows, the solver's ledger, HiAP's
expected MACs and projection, and the importance units. Each family's sub-package
(``models/eva``, ``models/beit``, ``models/swin``) says how its timm modules map onto these.
"""
