"""A structure HiAP learned on deit_small, for ``pyengine bench --spec`` (issue 14).

The demo's recipe (pyengine.experiments.demo: digits data, the same HiAP gates, budget and
schedule, round_to 8) scaled to deit_small_patch16_224 for a few CPU minutes:

1. deit_small (random init, 10 classes) at 64x64 inputs (16 patches + class token) trains
   ``--dense-epochs`` epochs on sklearn's digits with the trainer's recipe;
2. HiAP learns gates for ``--epochs`` epochs toward ``--target`` of the MACs (distilled from
   that dense model), as ``pyengine prune --method hiap`` does;
3. the learned gate logits move to a deit_small at 224x224 with 1000 classes (the model
   ``pyengine bench --model deit_small_patch16_224`` builds; gates do not depend on the token
   count or the classifier) and HiAP's finalize fixes the structure within 3% of ``--target``
   of *its* MACs (the attention's share grows with 197 tokens);
4. writes the spec (JSON, with how it was made in ``meta``).

Short training on small images learns a real but rough structure: what matters here is that
its heads have the uneven widths HiAP produces, not its accuracy (recorded in meta anyway).

    python bench/hiap_deit_small_spec.py --out bench/results/cpu/hiap_deit_small_50pct_spec.json
    pyengine bench --model deit_small_patch16_224 --spec bench/results/cpu/hiap_deit_small_50pct_spec.json ...

About 5-10 minutes on a 2-core CPU with the defaults.
"""
import argparse
import os
import sys
import tempfile
import time

# the prune job compiles the 64-pixel model at the end: no latency table is wanted for it
os.environ.setdefault("PYENGINE_LATENCY", "off")

import torch  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="spec.json to write")
    p.add_argument("--target", type=float, default=0.5, help="MAC fraction (default 0.5)")
    p.add_argument("--img-size", type=int, default=64, help="training input size (default 64)")
    p.add_argument("--dense-epochs", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3, help="HiAP epochs (default 3)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--model", default="deit_small_patch16_224",
                   help="timm model (default deit_small_patch16_224)")
    p.add_argument("--model-kwargs", default="{}",
                   help="JSON timm kwargs of the benched model (tests use a tiny one)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    import pyengine
    from pyengine.experiments.demo import DEMO, DEMO_RECIPE
    from pyengine.io.atomic import write_text
    from pyengine.methods.base import Budget, Training
    from pyengine.methods.hiap import HiAP, finalize, hiap_gates
    from pyengine.methods.pipeline import PruneJob, run
    from pyengine.models.vit.cost import total_macs
    from pyengine.structure.spec import Spec

    import json
    name = a.model
    kwargs = json.loads(a.model_kwargs)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        job = PruneJob(
            model=name, out=tmp, method="hiap", data="digits", model_kwargs=kwargs,
            recipe=DEMO_RECIPE, checkpoint=None, img_size=a.img_size,
            batch_size=a.batch_size, workers=0, augment=False, dense_epochs=a.dense_epochs,
            finetune=0,
            budget=Budget(target=a.target, tolerance=0.03, min_heads=1, min_head_dims=0.0,
                          min_ffn=0.0, round_to=DEMO["round_to"]),
            training=Training(epochs=a.epochs, lr=DEMO["lr"], weight_decay=0.05,
                              warmup_steps=0, grad_clip=None, kd_alpha=0.5,
                              kd_temperature=4.0, amp=None, seed=a.seed, device="cpu",
                              progress=True, resume=False),
            method_config=HiAP.Config(tau_start=2.0, tau_end=0.5, gate_lr=DEMO["gate_lr"],
                                      gate_init=3.0, budget_weight=20.0, macro_weight=2.0,
                                      micro_weight=1.0, feasibility_weight=1.0))
        res = run(job, log=lambda s: print(s, flush=True))
    small = res["gated"]
    m = res["metrics"]

    # the learned gates on the model the bench times (224 px, 1000 classes)
    big = pyengine.gate(pyengine.create_model(name, **kwargs).eval(), method="hiap")
    for (sa, sm), (ba, bm) in zip(hiap_gates(small), hiap_gates(big)):
        for src, dst in ((sa, ba), (sm, bm)):
            with torch.no_grad():
                for k, logit in src.logits.items():
                    dst.logits[k].copy_(logit)
    s = finalize(big, a.target, tolerance=0.03, min_heads=1, round_to=DEMO["round_to"])
    dense = total_macs(Spec.full(s.dense, model=name))
    ratio = total_macs(s) / dense
    shapes = sorted({(len(h.qk), len(h.v)) for b in s.blocks for h in b.heads})
    meta = {"made_by": "bench/hiap_deit_small_spec.py", "method": "hiap", "data": "digits",
            "train_img_size": a.img_size, "dense_epochs": a.dense_epochs, "epochs": a.epochs,
            "batch_size": a.batch_size, "seed": a.seed, "target": a.target,
            "model_kwargs": kwargs,
            "macs_ratio": ratio, "dense_top1_at_train_size": m["dense_top1"],
            "hiap_top1_at_train_size": m["pruned_top1"],
            "seconds": round(time.perf_counter() - t0, 1)}
    s = Spec(s.blocks, model=name, dense=s.dense, meta=meta)
    write_text(a.out, s.to_json())
    print(f"HiAP structure of {name} at {ratio:.3f} of the MACs: "
          f"{sum(len(b.heads) for b in s.blocks)} heads, {len(shapes)} distinct head shapes; "
          f"wrote {a.out} ({meta['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
