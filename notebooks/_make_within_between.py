"""Builds and executes notebooks/within_between.ipynb: `python notebooks/_make_within_between.py`."""
from _make_quickstart import build

CELLS = [
    ("md", r"""
# Within- and between-subject effects

A predictor measured repeatedly on the same subjects — stress on each day of a diary study, a
patient's dose at each visit, a school's spending each year — varies in two ways: **between**
subjects (some are more stressed than others on average) and **within** a subject (a subject is
more stressed on some days than on their own average). The two need not have the same effect.
People who are stressed on average may sleep much worse than others (a between-subject effect,
open to confounding by everything else that differs between people), while a more stressful day
than usual costs a given person only a little sleep (a within-subject effect, with each person
as their own control).

A random-intercept model with the raw predictor, `y ~ x + (1 | id)`, assumes the two effects are
equal and estimates one slope: a precision-weighted **blend** of the two. Splitting the predictor
into the subject mean $\bar x_j$ and the deviation from it, $x_{ij} - \bar x_j$, estimates both
(Neuhaus & Kalbfleisch 1998; Enders & Tofighi 2007; Bell & Jones 2015). In R this split is
`datawizard::demean(d, "x", "id")` or two `ave()` calls; here it is `lmmjax.center`.
"""),
    ("code", r"""
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

import lmmjax

rng = np.random.default_rng(7)
n_id, n_occ = 60, 8                                  # 60 subjects, 8 occasions each
beta_within, beta_between = 0.5, 2.0                 # the truth

id_ = np.repeat(np.arange(n_id), n_occ)
mu = rng.normal(0.0, 1.0, n_id)                      # each subject's typical x
x = mu[id_] + rng.normal(0.0, 0.5, n_id * n_occ)     # occasion-to-occasion variation around it
u = rng.normal(0.0, 1.0, n_id)                       # subject random intercept
y = 1.0 + beta_within * (x - mu[id_]) + beta_between * mu[id_] + u[id_] + rng.normal(0.0, 1.0, n_id * n_occ)
panel = pd.DataFrame({"id": pd.Categorical([f"s{j:02d}" for j in id_]),
                      "occasion": np.tile(np.arange(1, n_occ + 1), n_id), "x": x, "y": y})
panel.head()
"""),
    ("md", r"""
The data-generating model is

$$y_{ij} = 1 + 0.5\,(x_{ij} - \mu_j) + 2.0\,\mu_j + u_j + \varepsilon_{ij},\qquad
u_j \sim N(0, 1),\ \varepsilon_{ij} \sim N(0, 1),$$

where $\mu_j$ is subject $j$'s typical value of $x$: a within-subject effect of 0.5 and a
between-subject effect of 2.0.

## The naive model: one slope for both

`lmer(y ~ x + (1 | id))` in lme4:
"""),
    ("code", r"""
m_naive = lmmjax.lmer("y ~ x + (1 | id)", panel)
m_naive.coef_table()
"""),
    ("md", r"""
The single slope lies between 0.5 and 2.0 and its confidence interval covers neither: it
answers no question anyone asked. The random-intercept model's estimate is a weighted average of
the within-subject (fixed-effects) estimator and the between-subject estimator (regression of
the subject means), with weights set by how much information each carries — here mostly within,
so it leans towards 0.5 — and it is biased for the within effect whenever the two differ.
"""),
    ("code", r"""
naive = m_naive.coef_table().loc["x"]
assert beta_within < naive["estimate"] < beta_between
assert not (naive["lower"] <= beta_within <= naive["upper"])
assert not (naive["lower"] <= beta_between <= naive["upper"])
"""),
    ("md", r"""
## Centering within subjects

`lmmjax.center(panel, "x", by="id")` adds `x_between` (the subject's mean of `x`) and `x_within`
(the deviation from it; the within parts sum to zero in every subject):
"""),
    ("code", r"""
d = lmmjax.center(panel, "x", by="id")
assert np.allclose(d["x_between"] + d["x_within"], d["x"])
assert np.allclose(d.groupby("id", observed=True)["x_within"].sum(), 0.0)
d.head()
"""),
    ("code", r"""
m = lmmjax.lmer("y ~ x_within + x_between + (1 | id)", d)
m.summary()
"""),
    ("md", r"""
Each coefficient now answers its own question: `x_within` is the change in $y$ when a subject's
$x$ is one unit above their own average (its df ≈ 419 — it is estimated from the occasions);
`x_between` is the difference in $y$ between subjects whose average $x$ differs by one unit (df
≈ 58 = 60 subjects − 2: it is estimated from the subject means). Both are within two standard
errors of the truth:
"""),
    ("code", r"""
tab = m.coef_table()
truth = pd.Series({"x_within": beta_within, "x_between": beta_between})
z = (tab.loc[truth.index, "estimate"] - truth) / tab.loc[truth.index, "se"]
assert (z.abs() < 2).all(), z
pd.DataFrame({"truth": truth, "estimate": tab.loc[truth.index, "estimate"],
              "se": tab.loc[truth.index, "se"], "(estimate - truth) / se": z})
"""),
    ("md", r"""
## The contextual effect

The **contextual effect** $\beta_\text{between} - \beta_\text{within}$ is what the subject's average
adds beyond the within-subject effect: the difference in $y$ between two subjects with the same
$x$ today whose averages differ by one unit. Its test is the test of whether the naive model's
single slope is enough — the regression form of the Hausman test of random against fixed effects.
`m.test` tests any contrast $c^\top\beta$ (lmerTest's `contest`, Satterthwaite df); in R:
`contest(m, c(0, -1, 1), joint = FALSE)`.
"""),
    ("code", r"""
ctx = m.test({"x_between": 1, "x_within": -1})
ctx[["estimate", "se", "df", "t", "p", "lower", "upper"]].to_frame("x_between - x_within")
"""),
    ("md", r"""
Equivalently (Mundlak 1978), put the raw $x$ and the subject mean in the model:
`y ~ x + x_between + (1 | id)`. Then `x`'s coefficient is the within effect and `x_between`'s
*is* the contextual effect — the same numbers, from a reparametrized design.
"""),
    ("code", r"""
m_mundlak = lmmjax.lmer("y ~ x + x_between + (1 | id)", d)
mt = m_mundlak.coef_table()
np.testing.assert_allclose(mt.loc["x_between", ["estimate", "se", "df"]],
                           ctx[["estimate", "se", "df"]].astype(float), rtol=1e-6)
np.testing.assert_allclose(mt.loc["x", ["estimate", "se"]], tab.loc["x_within", ["estimate", "se"]], rtol=1e-6)
np.testing.assert_allclose(m_mundlak.loglik, m.loglik, rtol=1e-10)
true_ctx = beta_between - beta_within
assert abs(ctx["estimate"] - true_ctx) < 2 * ctx["se"]
assert ctx["p"] < 1e-6
mt
"""),
    ("md", r"""
## The picture

Ten of the subjects: each subject's observations and their own within-subject line (slope
$\hat\beta_\text{within}$ through the subject's mean point), the subject means (black) on the
between-subject line (slope $\hat\beta_\text{between}$), and the naive model's one slope (dashed).
"""),
    ("code", r"""
b = m.fixef
show = d["id"].cat.categories[:10]
means = d.groupby("id", observed=True)[["x", "y"]].mean()
fig, ax = plt.subplots(figsize=(7, 4.8))
colors = plt.get_cmap("tab10")
for k, j in enumerate(show):
    s = d[d["id"] == j]
    ax.scatter(s["x"], s["y"], s=12, color=colors(k), alpha=0.7)
    xs = np.linspace(s["x"].min(), s["x"].max(), 2)
    ax.plot(xs, means.loc[j, "y"] + b["x_within"] * (xs - means.loc[j, "x"]), color=colors(k), lw=1.5)
ax.scatter(means["x"], means["y"], s=18, color="black", zorder=3, label="subject means (all 60)")
grid = np.linspace(d["x"].min(), d["x"].max(), 2)
ax.plot(grid, b["(Intercept)"] + b["x_between"] * grid, color="black", lw=2,
        label=f"between: {b['x_between']:.2f}")
ax.plot(grid, m_naive.fixef["(Intercept)"] + m_naive.fixef["x"] * grid, color="0.4", ls="--", lw=2,
        label=f"naive: {m_naive.fixef['x']:.2f}")
ax.plot([], [], color="0.5", lw=1.5, label=f"within: {b['x_within']:.2f} (one line per subject)")
ax.set_xlabel("x")
ax.set_ylabel("y")
ax.legend(frameon=False, loc="upper left");
"""),
    ("md", r"""
**Which effect to report** depends on the question. For "what happens to this person if their $x$
goes up" the within effect is the relevant one, and it is protected from confounding by anything
constant within a subject. The between effect describes differences between people. The naive
single slope is interpretable only when the contextual effect is zero, which the test above
rejects firmly.
"""),
]

if __name__ == "__main__":
    build("within_between", CELLS)
