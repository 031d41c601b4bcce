"""Builds and executes notebooks/quickstart.ipynb: `python notebooks/_make_quickstart.py`.

Also holds `build(name, cells)`, which the other `_make_*.py` scripts use: it writes the
cells (("md" | "code", text) pairs) as a notebook, executes it in this folder with
nbclient (as tests/test_notebooks.py does) and saves it with its outputs."""
import sys
import time
from pathlib import Path

import nbclient
import nbformat

HERE = Path(__file__).parent


def build(name: str, cells) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"}}
    nb.cells = [nbformat.v4.new_markdown_cell(text.strip()) if kind == "md"
                else nbformat.v4.new_code_cell(text.strip()) for kind, text in cells]
    t0 = time.perf_counter()
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(HERE)}}).execute()
    for c in nb.cells:                       # no timing metadata: rebuilding changes only outputs
        c.metadata.pop("execution", None)
    path = HERE / f"{name}.ipynb"
    nbformat.write(nb, path)
    print(f"{path.name}: executed in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return path


CELLS = [
    ("md", r"""
# Quickstart: sleepstudy from the spaghetti plot to diagnostics

Belenky et al. (2003) restricted the sleep of 18 subjects to 3 hours a night and measured their
average reaction time (ms) on each of 10 days, `Days` 0 to 9 (lme4's `sleepstudy`; its newer
documentation notes that days 0–1 were adaptation and training, day 2 baseline). It is lme4's first example
and this notebook walks through it the way one would in R:

1. a random-intercept model, then a random-slope model, and which one the data want;
2. what the variance components mean (ICC, R²), and the subjects' conditional modes;
3. population-level vs subject-level predictions;
4. residual diagnostics;
5. small-sample inference for the fixed effects (Satterthwaite, Kenward-Roger).

The numbers R also computes are checked against R (lme4 1.1-31, lmerTest 3.1-3, pbkrtest
0.5.2, performance 0.10.2) in the cells that show them: the R call is written next to each value.
"""),
    ("code", r"""
import numpy as np
import pandas as pd

import lmmjax
from lmmjax import plots

pd.set_option("display.width", 120)
sleep = lmmjax.datasets.sleepstudy()       # = lme4::sleepstudy; Subject is a Categorical
print(sleep.shape)
sleep.head()
"""),
    ("md", r"""
## Model 1: a random intercept per subject

$$\text{Reaction}_{ij} = \beta_0 + \beta_1\,\text{Days}_{ij} + b_{0i} + \varepsilon_{ij},\qquad
b_{0i}\sim N(0,\sigma_0^2),\ \varepsilon_{ij}\sim N(0,\sigma^2)$$

Each subject gets their own baseline, but all share the same slope. The formula is lme4's,
unchanged; the fit is REML by default, as in `lmer()`.
"""),
    ("code", r"""
m0 = lmmjax.lmer("Reaction ~ Days + (1 | Subject)", sleep)
m0.summary()
"""),
    ("md", r"""
The spaghetti plot shows each subject's observations (dots), their fitted line
$\hat\beta_0 + \hat b_{0i} + \hat\beta_1\,\text{Days}$ and the population line in black. The
fitted lines are parallel by construction — and visibly wrong for several subjects, whose
reaction times rise much faster (or not at all).
"""),
    ("code", r"""
plots.spaghetti(m0, "Days", max_groups=18);
"""),
    ("md", r"""
## Model 2: a random slope as well

$$\text{Reaction}_{ij} = (\beta_0 + b_{0i}) + (\beta_1 + b_{1i})\,\text{Days}_{ij} + \varepsilon_{ij},
\qquad (b_{0i}, b_{1i}) \sim N(0, \Sigma)$$

`(Days | Subject)` gives each subject an intercept and a slope, correlated, exactly as in lme4.
"""),
    ("code", r"""
m1 = lmmjax.lmer("Reaction ~ Days + (Days | Subject)", sleep)
m1.summary()
"""),
    ("code", r"""
plots.spaghetti(m1, "Days", max_groups=18);
"""),
    ("md", r"""
The subjects' slopes vary with an SD of about 5.9 ms/day around the mean of 10.5 ms/day, and
their intercepts and slopes are nearly uncorrelated (0.07).

## Which model? AIC, BIC and the likelihood-ratio test

`lmmjax.compare` is lme4's `anova(m0, m1)`: both REML fits are refitted by maximum likelihood
(REML likelihoods are comparable only for identical fixed effects, and the LRT is about
likelihoods), then AIC, BIC, log-likelihood and the χ² test of each model against the previous
row are reported.
"""),
    ("code", r"""
cmp = lmmjax.compare(m0, m1, names=["intercept", "slope"])
cmp
"""),
    ("md", r"""
R says (`anova(m0, m1)` with lme4 1.1-31, the models fitted by `lmer()` as above):

```
   npar    AIC    BIC  logLik deviance  Chisq Df Pr(>Chisq)
m0    4 1802.1 1814.8 -897.04   1794.1
m1    6 1763.9 1783.1 -875.97   1751.9 42.139  2  7.072e-10 ***
```

Both criteria and the test prefer the random slope by a wide margin. The test has 2 df (the
slope's variance and its correlation with the intercept). The note under the table is the
usual caveat: the null value of a variance (0) is on the boundary of its space, so the χ²₂
reference distribution is conservative (the correct one is a 50:50 mixture of χ²₁ and χ²₂;
Self & Liang 1987, Stram & Lee 1994) — here it makes no difference.
"""),
    ("code", r"""
# R: a <- anova(m0, m1); sprintf("%.10g", c(a$Chisq[2], a[["Pr(>Chisq)"]][2]))
r_chisq, r_p = 42.13929854, 7.072412547e-10
# R: AIC(refitML(m0)), AIC(refitML(m1))
r_aic = [1802.078643, 1763.939344]
np.testing.assert_allclose(cmp.loc["slope", "chisq"], r_chisq, rtol=1e-4)
np.testing.assert_allclose(cmp.loc["slope", "p"], r_p, rtol=1e-4)
np.testing.assert_allclose(cmp["AIC"].to_numpy(), r_aic, rtol=1e-6)
assert cmp.loc["slope", "df"] == 2
print(f"chi2 = {cmp.loc['slope', 'chisq']:.6f} (R {r_chisq}), p = {cmp.loc['slope', 'p']:.6e} (R {r_p})")
"""),
    ("md", r"""
## What the variance components mean

**ICC of the intercept model.** With only a random intercept, the intraclass correlation is the
share of the non-fixed variance that lies between subjects, $\sigma_0^2/(\sigma_0^2+\sigma^2)$:
the correlation of two reaction times of the same subject (given Days). `performance::icc`
calls it the *adjusted* ICC; the *conditional* ICC (performance prints "Unadjusted ICC") also
counts the variance explained by the fixed effects in the denominator.

**R² of the slope model.** Nakagawa & Schielzeth's (2013) marginal R² is the share of the total
variance explained by the fixed effects alone; the conditional R² adds the random effects
(with a random slope, Johnson's 2014 average variance of $b_{0i} + b_{1i}\text{Days}$ over the
observations).
"""),
    ("code", r"""
icc0, r2_1 = m0.icc(), m1.r2()
# R: performance::icc(m0); performance::r2_nakagawa(m1)   (performance 0.10.2, 10 digits)
np.testing.assert_allclose(icc0[["adjusted", "conditional"]], [0.5893089171, 0.4243698156], rtol=1e-4)
np.testing.assert_allclose(r2_1[["marginal", "conditional"]], [0.2786510582, 0.7992199228], rtol=1e-4)
pd.Series({"ICC adjusted (intercept model)": icc0["adjusted"],
           "ICC conditional (intercept model)": icc0["conditional"],
           "R² marginal (slope model)": r2_1["marginal"],
           "R² conditional (slope model)": r2_1["conditional"]}).to_frame("value")
"""),
    ("md", r"""
Nearly 60% of the variance that Days does not explain lies between subjects. In the slope
model, Days alone explains 28% of the variance, Days together with the subjects' own lines 80%.

## The subjects: conditional modes

`m.ranef()` holds the conditional modes (BLUPs) $\hat b_i$, `m.ranef_sd()` their conditional SDs.
The caterpillar plot is lme4's `dotplot(ranef(m1, condVar = TRUE))`: each subject's deviation
from the population intercept and slope, with a 95% interval, sorted by the intercept.
"""),
    ("code", r"""
re = m1.ranef()["Subject"]
re.head()
"""),
    ("code", r"""
plots.caterpillar(m1);
"""),
    ("md", r"""
## Population vs per-subject predictions

`predict(newdata, re_form=False)` is the population line $\hat\beta_0 + \hat\beta_1\,\text{Days}$ —
what we expect for a *new* subject; the default (`re_form=None`) adds the subject's own
$\hat b_{0i} + \hat b_{1i}\,\text{Days}$. Both as in lme4's `predict.merMod`. Below: days 0, 5 and 9
for the fastest- and the slowest-deteriorating subject.
"""),
    ("code", r"""
fast, slow = re["Days"].idxmax(), re["Days"].idxmin()
new = pd.DataFrame({"Subject": pd.Categorical(np.repeat([fast, slow], 3), categories=sleep["Subject"].cat.categories),
                    "Days": np.tile([0, 5, 9], 2)})
new["population"] = m1.predict(new, re_form=False)
new["subject"] = m1.predict(new)

# the subject-level prediction is the subject's own line (fixed effect + conditional mode)
b = m1.fixef
own = (b["(Intercept)"] + re.loc[new["Subject"].astype(str), "(Intercept)"].to_numpy()
       + (b["Days"] + re.loc[new["Subject"].astype(str), "Days"].to_numpy()) * new["Days"])
np.testing.assert_allclose(new["subject"], own, rtol=1e-12)
np.testing.assert_allclose(new["population"], b["(Intercept)"] + b["Days"] * new["Days"], rtol=1e-12)
new
"""),
    ("md", r"""
## Diagnostics

`m.plot()` draws R's four standard panels for a mixed model: residuals against fitted values
(with a binned smoother), a normal QQ plot of the standardized residuals, a normal QQ plot of the
subjects' intercept modes, and the scale-location plot. The residuals are roughly normal with a
few large ones (subject 332 on day 6 lies 5.2 residual SDs above its line); nothing suggests a non-constant variance.
"""),
    ("code", r"""
m1.plot();
"""),
    ("md", r"""
## Small-sample inference for the fixed effects

With 18 subjects, the Wald z test is too optimistic. `summary()` already shows lmerTest's
Satterthwaite df; `coef_table(ddf=...)` gives the whole table for either method:

* **Satterthwaite** (lmerTest's default): the df of the t statistic from the variance of
  $\widehat{\mathrm{Var}}(\hat\beta_k)$ (lmerTest takes the Hessian of the criterion by finite
  differences; lmmjax by autodiff);
* **Kenward-Roger** (pbkrtest): an adjusted, larger covariance of $\hat\beta$ and a scaled F/t.

For this balanced design both give 17 df for Days (the number of subjects minus 1, the df one
would get from a paired analysis of the subjects' slopes), and the KR adjustment of the SE is nil.
"""),
    ("code", r"""
satt = m1.coef_table("satterthwaite")
kr = m1.coef_table("kenward-roger")
# R: coef(summary(m1, ddf = "Satterthwaite"))[, "df"]  (lmerTest)  -> 16.9997262885 16.9999837256
#    coef(summary(m1, ddf = "Kenward-Roger"))[, "df"]  (pbkrtest)  -> 17 17
np.testing.assert_allclose(satt.loc["Days", "df"], 16.9999837256, rtol=1e-4)
np.testing.assert_allclose(kr.loc["Days", "df"], 17.0, rtol=1e-4)
# Days' KR standard error (pbkrtest's vcovAdj): 1.54578964391
np.testing.assert_allclose(kr.loc["Days", "se"], 1.54578964391, rtol=1e-5)
pd.concat({"Satterthwaite": satt, "Kenward-Roger": kr})
"""),
    ("md", r"""
Reaction times grow by 10.5 ms per day of restricted sleep (95% CI 7.2 to 13.7 ms/day,
t = 6.77 on 17 df, p = 3.3·10⁻⁶) — the same numbers `summary(m1)` prints with lmerTest loaded.
"""),
]

if __name__ == "__main__":
    build("quickstart", CELLS)
