"""Command line: ``lmmjax demo`` and ``lmmjax fit FORMULA DATA.csv``."""
from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    import lmmjax

    data = lmmjax.datasets.load(args.dataset)
    formula = args.formula or _DEMOS[args.dataset.lower()]
    m = lmmjax.lmer(formula, data, reml=not args.ml)
    print(m.summary())
    return 0


def _fit(args) -> int:
    import pandas as pd

    import lmmjax

    data = pd.read_csv(args.data)
    data._lmmjax_name = args.data
    m = lmmjax.lmer(args.formula, data, reml=not args.ml)
    print(m.summary())
    return 0


_DEMOS = {
    "sleepstudy": "Reaction ~ Days + (Days | Subject)",
    "dyestuff": "Yield ~ 1 + (1 | Batch)",
    "dyestuff2": "Yield ~ 1 + (1 | Batch)",
    "penicillin": "diameter ~ 1 + (1 | plate) + (1 | sample)",
    "pastes": "strength ~ 1 + (1 | batch/cask)",
    "orthodont": "distance ~ age * Sex + (age | Subject)",
    "ovary": "follicles ~ np.sin(2 * np.pi * Time) + np.cos(2 * np.pi * Time) + (1 | Mare)",
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lmmjax", description="Linear mixed models with JAX")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="fit a bundled data set and print the lme4-style summary")
    d.add_argument("dataset", nargs="?", default="sleepstudy", choices=sorted(_DEMOS))
    d.add_argument("--formula", help="override the demo formula")
    d.add_argument("--ml", action="store_true", help="maximum likelihood instead of REML")
    d.set_defaults(func=_demo)
    f = sub.add_parser("fit", help="fit FORMULA to a CSV file")
    f.add_argument("formula")
    f.add_argument("data", help="CSV file")
    f.add_argument("--ml", action="store_true", help="maximum likelihood instead of REML")
    f.set_defaults(func=_fit)
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError) as exc:
        print(f"lmmjax: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
