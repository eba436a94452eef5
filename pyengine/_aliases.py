"""The import paths of pyengine before its sub-packages (``pyengine.importance``,
``pyengine.allocate``, ``pyengine.optim``, ...) keep working: each old name is an alias of the
module that now holds that code, resolved on first import."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

OLD = {
    "pyengine.allocate": "pyengine.structure.solver",
    "pyengine.atomic": "pyengine.io.atomic",
    "pyengine.baselines": "pyengine.measure.baselines",
    "pyengine.bench": "pyengine.measure.bench",
    "pyengine.checkpoint": "pyengine.train.checkpoint",
    "pyengine.compact": "pyengine.models.vit.compact",
    "pyengine.cost_model": "pyengine.cost.model",
    "pyengine.data": "pyengine.train.data",
    "pyengine.demo": "pyengine.experiments.demo",
    "pyengine.distributed": "pyengine.train.distributed",
    "pyengine.expected_cost": "pyengine.cost.expected",
    "pyengine.gated": "pyengine.models.vit.gated",
    "pyengine.gates": "pyengine.structure.gates",
    "pyengine.hiap": "pyengine.methods.hiap",
    "pyengine.importance": "pyengine.methods.criteria",
    "pyengine.limit": "pyengine.experiments.limit",
    "pyengine.oneshot": "pyengine.methods.oneshot",
    "pyengine.optim": "pyengine.methods.apg",
    "pyengine.padded": "pyengine.models.vit.padded",
    "pyengine.prune": "pyengine.methods.pipeline",
    "pyengine.resnet": "pyengine.models.resnet.blocks",
    "pyengine.route": "pyengine.experiments.route",
    "pyengine.spec": "pyengine.structure.spec",
    "pyengine.sss": "pyengine.methods.sss",
    "pyengine.sweep": "pyengine.experiments.sweep",
    "pyengine.synthetic": "pyengine.structure.synthetic",
    "pyengine.timing": "pyengine.measure.timing",
    "pyengine.vit": "pyengine.models.vit.adapter",
    "pyengine.zoo": "pyengine.models.zoo",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name in OLD:
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        module = importlib.import_module(OLD[spec.name])
        self._own_spec = module.__spec__
        return module

    def exec_module(self, module):
        # the target module ran already (the alias is the same object); the import system set
        # its __spec__ to the alias's: give it back its own
        module.__spec__ = self._own_spec


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
    # an old module name that is also a public function (pyengine.spec) is bound up front: the
    # first import of a submodule sets it as an attribute of the package, which would replace
    # the function
    pkg = sys.modules["pyengine"]
    for old, new in OLD.items():
        if callable(getattr(pkg, old.rsplit(".", 1)[1], None)) and old not in sys.modules:
            sys.modules[old] = importlib.import_module(new)
