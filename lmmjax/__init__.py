"""lmmjax: linear mixed models in JAX, with lme4's formulas and numbers.

>>> import lmmjax
>>> m = lmmjax.lmer("Reaction ~ Days + (Days | Subject)", lmmjax.datasets.sleepstudy())
>>> print(m.summary())
"""
from ._cache import enable_persistent_cache

enable_persistent_cache()

from . import datasets  # noqa: E402
from ._compute import set_cpu_threads  # noqa: E402
from .design import DataError  # noqa: E402
from .formula import FormulaError, InputError  # noqa: E402
from .model import FitError, lmer, precision  # noqa: E402
from .optimize import ConvergenceWarning, SingularFitWarning  # noqa: E402
from .results import LmerResult  # noqa: E402
from . import confint  # noqa: E402
from . import residual as cov  # noqa: E402
from .compare import compare  # noqa: E402
from .gls import GroupedResult, gls  # noqa: E402


#: names imported on first use (pertpy, if installed, is heavy; the rest keep import short)
#: (a module's name must differ from the names it provides here: importing lmmjax.x binds
#: the attribute lmmjax.x to the module)
_LAZY = {"pseudobulk": "singlecell", "LmerDE": "singlecell", "center": "effectsize", "power": "simulation",
         "lmer_batch": "batch", "BatchResult": "batch"}
#: submodules reachable as attributes before anyone imports them
_SUBMODULES = ("plots", "effectsize", "emmeans", "batch", "simulation")


def __getattr__(name):
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'lmmjax' has no attribute {name!r}")


__version__ = "0.1.0"
__all__ = [
    "lmer", "lmer_batch", "gls", "cov", "GroupedResult", "BatchResult", "compare", "confint", "precision", "set_cpu_threads", "datasets", "LmerResult", "DataError", "FormulaError", "InputError", "FitError",
    "ConvergenceWarning", "SingularFitWarning", "pseudobulk", "LmerDE", "center", "power",
]
