"""The ``pyengine`` command line."""
from __future__ import annotations

import argparse
import json
import sys

# Subcommands that live in their own module, pyengine/commands/<name>.py, each defining
# ``add_arguments(parser)`` and ``run(args) -> int``. Until a module exists the command is
# listed as planned so --help shows the whole tool.
PLUGINS = {
    "prune": ("learn or score a structure and write a compact model (HiAP: issue #3, SSS: "
              "#6, one-shot criteria: #7)"),
    "bench": "GPU/CPU latency of dense, compact, padded and Torch-Pruning variants (issue #9)",
    "profile": "per-layer roofline profile of a model (issue #9)",
    "sweep": "accuracy vs compression for every one-shot criterion (issue #7)",
    "route": "hybrid routing between a pruned light expert and the dense model (issue #7)",
    "limit": "predicted vs measured pruning limit (issue #8)",
}
PLANNED = PLUGINS  # kept for callers of the first version


def _plugin(name: str):
    import importlib
    try:
        return importlib.import_module(f"pyengine.cli.commands.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"pyengine.cli.commands.{name}":
            raise  # the module exists but something it imports is missing: say so
        return None


def _model(name_or_dir: str):
    from pathlib import Path

    import pyengine
    if Path(name_or_dir).is_dir():
        return pyengine.load(name_or_dir)
    return pyengine.create_model(name_or_dir)


def cmd_demo(a) -> int:
    from pyengine.experiments.demo import main as demo_main
    return demo_main(a)


def cmd_spec(a) -> int:
    import pyengine
    print(pyengine.spec(_model(a.model)).to_json(), end="")
    return 0


def cmd_cost(a) -> int:
    import pyengine
    model = _model(a.model)
    if a.spec:
        pyengine.gate(model)
        pyengine.apply(model, pyengine.Spec.load(a.spec))
    c = pyengine.cost(model, batch=a.batch, dtype=a.dtype, device=a.device)
    print(c.table())
    if a.json:
        with open(a.json, "w") as f:
            json.dump(c.as_dict(), f, indent=2)
    return 0


def cmd_compile(a) -> int:
    import pyengine
    model = pyengine.create_model(a.model)
    dense_macs = pyengine.cost(model).macs
    pyengine.gate(model)
    pyengine.apply(model, pyengine.Spec.load(a.spec))
    compact = pyengine.compile(model)
    pyengine.save(compact, a.out)
    r = pyengine.cost(compact).macs / dense_macs
    print(f"wrote {a.out} (MAC ratio {r:.3f})")
    return 0


def _planned(name):
    def run(a) -> int:
        print(f"pyengine {name}: not available in this version yet: {PLUGINS[name]}",
              file=sys.stderr)
        return 2
    return run


def build_parser() -> argparse.ArgumentParser:
    from pyengine import __version__
    p = argparse.ArgumentParser(prog="pyengine", description=(
        "Structured pruning of timm Vision Transformers into dense, smaller models that are "
        "measured, not estimated, to be faster."))
    p.add_argument("--version", action="version", version=f"pyengine {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("demo", help="the main job: train a small ViT on digits, prune it with "
                                    "HiAP to 50%% MACs, compile, check, time dense vs compact "
                                    "on this CPU")
    from pyengine.experiments.demo import add_arguments as demo_arguments
    demo_arguments(d)
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("spec", help="print the structure spec of a model (full for dense timm)")
    s.add_argument("--model", required=True, help="timm model name or pyengine.save directory")
    s.set_defaults(func=cmd_spec)

    c = sub.add_parser("cost", help="analytical MACs / bytes / roofline per layer")
    c.add_argument("--model", required=True, help="timm model name or pyengine.save directory")
    c.add_argument("--spec", help="spec.json to apply to a timm model first")
    c.add_argument("--batch", type=int, default=1)
    c.add_argument("--dtype", default="float32", help="float32, bf16, fp16")
    c.add_argument("--device", default=None, help="peaks to classify against: cpu, h100, h200, a100")
    c.add_argument("--json", help="also write the cost as JSON here")
    c.set_defaults(func=cmd_cost)

    k = sub.add_parser("compile", help="apply a spec to a timm model, compile, save")
    k.add_argument("--model", required=True, help="timm model name")
    k.add_argument("--spec", required=True, help="spec.json (pyengine spec --model NAME > it)")
    k.add_argument("--out", required=True, help="output directory")
    k.set_defaults(func=cmd_compile)

    for name, text in PLUGINS.items():
        mod = _plugin(name)
        if mod is None:
            sub.add_parser(name, help=f"[planned] {text}").set_defaults(func=_planned(name))
            continue
        sp = sub.add_parser(name, help=getattr(mod, "HELP", text),
                            description=getattr(mod, "DESCRIPTION", None))
        mod.add_arguments(sp)
        sp.set_defaults(func=mod.run)
    return p


def main(argv: list[str] | None = None) -> int:
    from pyengine.models.vit.gated import UnsupportedModuleError
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.command is None:
        parser.print_help()
        return 0
    try:
        return a.func(a)
    except (ValueError, FileNotFoundError, NotImplementedError, UnsupportedModuleError) as e:
        # bad specs, unsupported models, missing files: a message, not a traceback
        print(f"pyengine {a.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
