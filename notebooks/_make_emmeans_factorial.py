"""Builds and executes notebooks/emmeans_factorial.ipynb: `python notebooks/_make_emmeans_factorial.py`.

The R reference values in the notebook come from R 4 with lme4, lmerTest and emmeans; the R
calls are written next to each value."""
from _make_quickstart import build

CELLS = [
    ("md", r"""
# Estimated marginal means for a split-plot factorial: Yates' oats

Yates (1935) compared three oat varieties under four doses of nitrogen manure (0, 0.2, 0.4 and
0.6 cwt/acre) in a **split-plot** design: 6 blocks, each divided into 3 whole plots that received
one variety, each whole plot divided into 4 subplots that received one nitrogen dose — 72
yields in all (nlme's `Oats`, MASS's `oats`). Variety is compared between whole plots and
nitrogen within them, so the model needs two error strata, a block effect and a whole-plot
(variety-within-block) effect:

$$y_{bvn} = \mu + \alpha_v + \beta_n + (\alpha\beta)_{vn} + u_b + w_{bv} + \varepsilon_{bvn},\qquad
u_b\sim N(0,\sigma^2_B),\ w_{bv}\sim N(0,\sigma^2_{W}),\ \varepsilon\sim N(0,\sigma^2)$$

— in lme4, `lmer(yield ~ Variety * factor(nitro) + (1 | Block/Variety))`. This notebook does
with `lmmjax` what one does in R with lmerTest and **emmeans**: the Type III ANOVA table,
estimated marginal means (EMMs), Tukey pairwise comparisons, comparisons with a control, a
polynomial trend contrast, Satterthwaite vs Kenward-Roger degrees of freedom, and an interaction
plot. Every number R also computes is asserted against R's (relative tolerance 1e-4), with the R
call next to it.
"""),
    ("code", r"""
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

import lmmjax

pd.set_option("display.width", 140)
pd.set_option("display.precision", 5)

# the 72 rows of nlme::Oats (R: write.csv(as.data.frame(nlme::Oats)), Block in field order)
oats = pd.read_csv("../tests/fixtures/emmeans/oats.csv")
oats["Block"] = pd.Categorical(oats["Block"], categories=["I", "II", "III", "IV", "V", "VI"])
print(oats.shape)
oats.pivot_table(index=["Block", "Variety"], columns="nitro", values="yield", observed=True).head(6)
"""),
    ("code", r"""
def check(ours, r, rtol=1e-4, atol=0.0):
    # our values against R's, elementwise: |ours - r| <= atol + rtol * |r|
    np.testing.assert_allclose(np.asarray(ours, float), np.asarray(r, float), rtol=rtol, atol=atol)

# R's adjusted p-values come from ptukey, whose upper tail is 1 - cdf: near 1e-12 it is
# accurate to ~1e-13 absolute only (for the same q it gives 4.255e-12 and 4.260e-12 at two df that
# differ by 1e-9 relative; scipy's studentized range gives 3.999e-12), so p-values are compared
# with an absolute floor of 1e-11 as well as 1e-4 relative.
P_ATOL = 1e-11
"""),
    ("md", r"""
## The fit and the Type III ANOVA

`nitro` is numeric in the data; `factor(nitro)` in the formula makes it a four-level factor, as in
R. The fit is REML. `m.anova()` is lmerTest's `anova(fit, type = 3)` with Satterthwaite's
denominator df: variety is tested against the whole-plot stratum (≈ 10 df = (6 − 1)(3 − 1)), nitrogen
and the interaction against the subplot stratum (45 df) — the classical split-plot ANOVA, which
REML reproduces exactly in a balanced design.
"""),
    ("code", r"""
m = lmmjax.lmer("yield ~ Variety * factor(nitro) + (1 | Block/Variety)", oats)
m.summary()
"""),
    ("code", r"""
aov = m.anova()          # type=3, ddf="satterthwaite"
aov
"""),
    ("code", r"""
# R: anova(lmerTest::lmer(yield ~ Variety * nitro + (1 | Block/Variety), d), type = 3)
#    (d = the CSV with nitro as a factor)
check(aov["F"], [1.485341089, 37.68570408, 0.3028239865])
check(aov["den_df"], [10.00001754, 45.00003584, 45.00003584])
check(aov["p"], [0.2723866334, 2.457627051e-12, 0.9321985272], atol=P_ATOL)
"""),
    ("md", r"""
The interaction is far from significant (p = 0.93), so the nitrogen effect can be summarized over
varieties. R's emmeans would still warn *"Results may be misleading due to involvement in
interactions"* — the marginal means below average over the other factor with equal weights.

## EMMs of nitrogen

`m.emmeans("nitro")` is `emmeans(fit, "nitro")`: the reference grid is every Variety × nitro
combination, and each nitrogen EMM is the equally weighted mean of its three varieties'
predictions, $\bar x^\top\hat\beta$. Its standard error involves all three variance components,
so its Satterthwaite df (≈ 6.8) lies between the strata's.

Note that emmeans' own default for lme4 fits is Kenward-Roger; lmmjax's is Satterthwaite (as
lmerTest's `summary`) — R's values below are from `emmeans(fit, "nitro", lmer.df = "satterthwaite")`.
"""),
    ("code", r"""
emm_n = m.emmeans("nitro")
emm_n.table
"""),
    ("code", r"""
# R: emmeans(fit, "nitro", lmer.df = "satterthwaite")
t = emm_n.table
check(t["emmean"], [79.38888889, 98.88888889, 114.2222222, 123.3888889])
check(t["SE"], [7.174754083] * 4)
check(t["df"], [6.79188614] * 4)
check(t["lower"], [62.31733698, 81.81733698, 97.15067031, 106.317337])
"""),
    ("md", r"""
## Tukey pairwise comparisons and comparisons with the control

`.pairs()` is emmeans' `pairs()`: all six differences, with Tukey-adjusted p-values and
simultaneous intervals (the studentized range with 4 means). `.contrast("trt.vs.ctrl")` compares
each dose with the first level (no manure), Dunnett-adjusted (emmeans' `"dunnettx"`
approximation, its default for this method).
"""),
    ("code", r"""
pw = emm_n.pairs()
pw.table
"""),
    ("code", r"""
# R: pairs(emmeans(fit, "nitro", lmer.df = "satterthwaite")), summary(..., infer = TRUE)
t = pw.table
check(t["estimate"], [-19.5, -34.83333333, -44, -15.33333333, -24.5, -9.166666667])
check(t["SE"], [4.435752047] * 6)
check(t["df"], [45.00003584] * 6)
check(t["p"], [0.0003764262062, 3.362259249e-09, 4.266031972e-12, 0.006390159932, 9.244703399e-06,
               0.179718947], atol=P_ATOL)
check(t["lower"], [-31.33325305, -46.66658639, -55.83325305, -27.16658639, -36.33325305, -20.99991972])
"""),
    ("code", r"""
ctrl = emm_n.contrast("trt.vs.ctrl")
# R: contrast(emmeans(fit, "nitro", lmer.df = "satterthwaite"), "trt.vs.ctrl"), infer = TRUE
check(ctrl.table["estimate"], [19.5, 34.83333333, 44])
check(ctrl.table["p"], [0.0001956759483, 1.690199869e-09, 2.17803553e-12], atol=P_ATOL)
check(ctrl.table["lower"], [8.659939987, 23.99327332, 33.15993999])
ctrl.table
"""),
    ("md", r"""
## A polynomial trend over the doses

The doses are equally spaced, so the orthogonal polynomial coefficients (R's `contr.poly` up to
scaling; emmeans' `"poly"` method uses these integers) split the nitrogen effect into a linear,
a quadratic and a cubic part. A custom contrast is a dict of weights over the EMMs, in level
order; with no adjustment asked for, each is a plain t test.
"""),
    ("code", r"""
trend = emm_n.contrast({"linear": [-3, -1, 1, 3], "quadratic": [1, -1, -1, 1], "cubic": [-1, 3, -3, 1]})
# R: contrast(emmeans(fit, "nitro", lmer.df = "satterthwaite"), "poly")
check(trend.table["estimate"], [147.3333333, -10.33333333, -2])
check(trend.table["SE"], [14.02707961, 6.273100705, 14.02707961])
check(trend.table["p"], [1.091342769e-13, 0.1064742363, 0.8872573236], atol=P_ATOL)
trend.table
"""),
    ("md", r"""
The yield rises linearly with the dose — the least-squares line through the four EMMs climbs
2 × 147.3 / 20 = 14.7 units per 0.2 cwt step (consecutive weights differ by 2, Σc² = 20) — with
no evidence of curvature (quadratic p = 0.11, cubic p = 0.89) over
the range tried.

## Varieties within each dose

`m.emmeans("Variety", by="nitro")` gives the 12 cell means, and `.pairs()` compares the varieties
*within* each dose (Tukey over 3 means in each of 4 families). Variety differences are whole-plot
comparisons, so their df (≈ 30) and standard errors (9.7 vs 4.4 for doses) are those of the
coarser stratum mixed with the subplot one.
"""),
    ("code", r"""
emm_vn = m.emmeans("Variety", by="nitro")
# R: emmeans(fit, "Variety", by = "nitro", lmer.df = "satterthwaite")
check(emm_vn.table["emmean"], [80, 86.66666667, 71.5, 98.5, 108.5, 89.66666667, 114.6666667, 117.1666667,
                               110.8333333, 124.8333333, 126.8333333, 118.5])
check(emm_vn.table["SE"], [9.107010315] * 12)
check(emm_vn.table["df"], [16.08157089] * 12)
pv = emm_vn.pairs()
# R: pairs(emmeans(fit, "Variety", by = "nitro", lmer.df = "satterthwaite"))
check(pv.table["p"], [0.773250164, 0.6599568148, 0.2776846212, 0.5644691818, 0.6387322135, 0.1453273718,
                      0.964196807, 0.9179935898, 0.7927124791, 0.9769247237, 0.7927124791, 0.6705350145])
pv.table
"""),
    ("md", r"""
## Interaction plot

EMMs of each variety across the doses with their 95% confidence intervals (each interval is for
one mean; the pairwise tests above are the right tool for comparing them). The lines are roughly
parallel — the non-significant interaction.
"""),
    ("code", r"""
fig, ax = plt.subplots(figsize=(6, 4))
tab = emm_vn.table
for k, (variety, g) in enumerate(tab.groupby("Variety", sort=False)):
    x = g["nitro"].to_numpy() + (k - 1) * 0.008        # dodge the bars
    ax.errorbar(x, g["emmean"], yerr=[g["emmean"] - g["lower"], g["upper"] - g["emmean"]],
                marker="o", capsize=3, label=variety)
ax.set_xlabel("nitrogen (cwt/acre)")
ax.set_ylabel("yield EMM (1/4 lbs per subplot)")
ax.set_xticks([0, 0.2, 0.4, 0.6])
ax.legend(title="Variety", frameon=False)
ax.set_title("Oats: EMMs with 95% CIs (Satterthwaite df)")
plt.show()
"""),
    ("md", r"""
## Satterthwaite vs Kenward-Roger

In this balanced design the two methods agree: the Kenward-Roger adjustment of Var(β̂) is zero
for these means and the two df coincide (to 1e-9 here; lmerTest's finite-difference derivatives put
R's Satterthwaite df 2e-5 below its Kenward-Roger df, lmmjax differentiates exactly).
"""),
    ("code", r"""
emm_kr = m.emmeans("nitro", ddf="kenward-roger")
# R: emmeans(fit, "nitro", lmer.df = "kenward-roger")
check(emm_kr.table["SE"], [7.174754083] * 4)
check(emm_kr.table["df"], [6.792020479] * 4)
pd.DataFrame({"SE (Satterthwaite)": emm_n.table["SE"].to_numpy(), "SE (KR)": emm_kr.table["SE"].to_numpy(),
              "df (Satterthwaite)": emm_n.table["df"].to_numpy(), "df (KR)": emm_kr.table["df"].to_numpy()},
             index=pd.Index(emm_n.table["nitro"], name="nitro"))
"""),
    ("md", r"""
They part company once the design is unbalanced. Drop five yields (rows 1, 8, 15, 30 and 47 of
the data, say lost plots) and compare the variety EMMs: Kenward-Roger inflates the standard
errors slightly (its bias correction of Var(β̂) for the estimated variance components) and gives
somewhat larger df than Satterthwaite. With ≈ 9 df, either is a long way from the asymptotic
z-test's infinite df.
"""),
    ("code", r"""
lost = oats.drop(index=[0, 7, 14, 29, 46])          # R: d[-c(1, 8, 15, 30, 47), ]
mu = lmmjax.lmer("yield ~ Variety * factor(nitro) + (1 | Block/Variety)", lost)
rows = {}
for ddf in ["satterthwaite", "kenward-roger", "asymptotic"]:
    e = mu.emmeans("Variety", ddf=ddf)
    rows[ddf] = e
    print(ddf)
    print(e.pairs().table[["contrast", "estimate", "SE", "df", "p"]].to_string(index=False), "\n")
pd.concat({k: e.table.set_index("Variety")[["SE", "df", "lower", "upper"]] for k, e in rows.items()},
          axis=1).round(3)
"""),
    ("code", r"""
# R: mu <- lmer(yield ~ Variety * nitro + (1 | Block/Variety), d[-c(1, 8, 15, 30, 47), ])
#    emmeans(mu, "Variety", lmer.df = "satterthwaite") and pairs(...)
s, k = rows["satterthwaite"], rows["kenward-roger"]
check(s.table["emmean"], [104.1052027, 109.8550215, 98.09932329])
check(s.table["SE"], [8.28851002, 8.263892203, 8.28851002])
check(s.table["df"], [8.676045562, 8.573603664, 8.676045561])
check(s.pairs().table["SE"], [7.488362954, 7.514516257, 7.488362954])
check(s.pairs().table["df"], [9.69385982, 9.821176658, 9.693859819])
check(s.pairs().table["p"], [0.730383009, 0.7120344512, 0.3033956223])
#    emmeans(mu, "Variety", lmer.df = "kenward-roger") and pairs(...)
check(k.table["SE"], [8.289765716, 8.264759343, 8.289765716])
check(k.table["df"], [8.867058786, 8.76318914, 8.867058786])
check(k.pairs().table["SE"], [7.490538133, 7.517460375, 7.490538133])
check(k.pairs().table["df"], [9.908556785, 10.03746858, 9.908556785])
check(k.pairs().table["p"], [0.7303534617, 0.7120403966, 0.3026914799])
print("all values agree with R's lmerTest + emmeans to 1e-4 relative")
"""),
    ("md", r"""
## Summary

| R (lmerTest, emmeans) | lmmjax |
|---|---|
| `anova(fit, type = 3)` | `m.anova()` |
| `emmeans(fit, "nitro", lmer.df = "satterthwaite")` | `m.emmeans("nitro")` |
| `emmeans(fit, "Variety", by = "nitro")` | `m.emmeans("Variety", by="nitro")` |
| `pairs(emm)` | `emm.pairs()` |
| `contrast(emm, "trt.vs.ctrl")` | `emm.contrast("trt.vs.ctrl")` |
| `contrast(emm, list(linear = c(-3, -1, 1, 3)))` | `emm.contrast({"linear": [-3, -1, 1, 3]})` |
| `emmeans(fit, ..., lmer.df = "kenward-roger")` | `m.emmeans(..., ddf="kenward-roger")` |
| `summary(emm, infer = TRUE)` | `emm.table` (CIs and tests together) |
"""),
]

if __name__ == "__main__":
    build("emmeans_factorial", CELLS)
