"""Builds and executes notebooks/pseudoreplication.ipynb: `python notebooks/_make_pseudoreplication.py`."""
from _make_quickstart import build

CELLS = [
    ("md", r"""
# Pseudoreplication in single-cell differential expression

In a single-cell study the unit that receives the condition is the **donor**, not the cell:
12 donors, 6 treated and 6 controls, each contributing 40–60 cells. Cells of one donor share
that donor's genetics, sample handling and batch, so their expression is correlated. A test that
treats every cell as an independent replicate — a t-test or Wilcoxon test over cells, still the
default of many single-cell toolkits — counts ~600 observations where the data hold
information about 12 donors. Its standard error is too small and it finds "differences" that are
only donor-to-donor variation (Lazic 2010; Zimmerman, Espeland & Langefeld 2021; Squair et al.
2021).

The mixed model treats the donor as what it is, a random sample of donors:

$$y_{gcd} = \beta_{0g} + \beta_{1g}\,\text{stim}_d + u_{gd} + \varepsilon_{gcd},\qquad
u_{gd}\sim N(0,\sigma^2_{u,g}),\ \varepsilon_{gcd}\sim N(0,\sigma^2_g)$$

for gene $g$, cell $c$ and donor $d$ — in lme4, `lmer(y ~ condition + (1 | donor))` gene by
gene. `lmmjax.lmer_batch` fits that model to all genes at once.

This notebook simulates data in which **no gene responds to the condition** and counts how often
each method says otherwise.
"""),
    ("code", r"""
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy import stats

import lmmjax
from lmmjax import plots

rng = np.random.default_rng(20240611)
n_donors, n_genes = 12, 2000

donors = [f"d{i:02d}" for i in range(n_donors)]
condition = np.repeat(["ctrl", "stim"], n_donors // 2)       # 6 control donors, 6 stimulated
n_cells = rng.integers(40, 61, size=n_donors)               # 40-60 cells per donor
obs = pd.DataFrame({"donor": pd.Categorical(np.repeat(donors, n_cells)),
                    "condition": pd.Categorical(np.repeat(condition, n_cells), categories=["ctrl", "stim"])})

# per gene: ICC = donor variance / total variance, drawn from U(0.1, 0.3); total variance 1
icc = rng.uniform(0.1, 0.3, size=n_genes)
donor_effect = rng.standard_normal((n_donors, n_genes)) * np.sqrt(icc)
Y = donor_effect[obs["donor"].cat.codes] + rng.standard_normal((len(obs), n_genes)) * np.sqrt(1 - icc)
genes = [f"gene{g:04d}" for g in range(n_genes)]
print(f"{len(obs)} cells from {n_donors} donors x {n_genes} genes; no condition effect in any gene")
obs.groupby("donor", observed=True).agg(condition=("condition", "first"), cells=("condition", "size")).T
"""),
    ("md", r"""
## Three tests per gene

1. **Cell-level t-test** (`scipy.stats.ttest_ind`): stimulated cells against control cells,
   ~590 df.
2. **Mixed model** `~ condition + (1 | donor)` by REML, with lmerTest's Satterthwaite df for
   the condition coefficient (about 10: 12 donors minus 2 fixed effects).
3. **Pseudobulk**: average each donor's cells (`lmmjax.pseudobulk`) and t-test the 6 + 6 donor
   means, 10 df. (With counts one would sum instead and use edgeR/DESeq2; the data here are
   already on a log-like, Gaussian scale.)
"""),
    ("code", r"""
stim = (obs["condition"] == "stim").to_numpy()
p_cells = stats.ttest_ind(Y[stim], Y[~stim], axis=0).pvalue

res = lmmjax.lmer_batch("~ condition + (1 | donor)", data=obs, responses=pd.DataFrame(Y, columns=genes),
                        progress=False)
lmm = res.coef_table("conditionstim", ddf="satterthwaite")

pb_obs, pb_Y = lmmjax.pseudobulk(obs, ["donor", "condition"], responses=Y, func="mean")
pb_stim = (pb_obs["condition"] == "stim").to_numpy()
p_pseudo = stats.ttest_ind(pb_Y[pb_stim], pb_Y[~pb_stim], axis=0).pvalue

print(f"fits: {int(lmm['converged'].sum())} of {n_genes} converged, {int(lmm['singular'].sum())} singular "
      f"(donor variance estimated as 0); median Satterthwaite df {lmm['df'].median():.2f}")
lmm.head()
"""),
    ("md", r"""
## False-positive rates at α = 0.05

Every gene is null, so a calibrated test rejects 5% of them, up to binomial noise: with 2,000
genes the rate of a calibrated test lies in the 99% band below in 99 runs out of 100.
"""),
    ("code", r"""
alpha = 0.05
band = np.array(stats.binom.interval(0.99, n_genes, alpha)) / n_genes
pvals = {"cell-level t-test": p_cells, "mixed model (Satterthwaite)": lmm["p"].to_numpy(),
         "pseudobulk t-test": p_pseudo}
fpr = pd.Series({name: np.mean(p < alpha) for name, p in pvals.items()})
print(f"calibrated: 5%, 99% binomial band for {n_genes} genes: [{band[0]:.2%}, {band[1]:.2%}]")
bh = pd.Series({name: int(np.sum(stats.false_discovery_control(p) < alpha)) for name, p in pvals.items()})
pd.DataFrame({"false-positive rate": fpr.map("{:.2%}".format),
              "genes with p < 0.05": {name: int(np.sum(p < alpha)) for name, p in pvals.items()},
              "BH discoveries (FDR 5%)": bh})
"""),
    ("code", r"""
assert lmm["converged"].all()
assert band[0] <= fpr["mixed model (Satterthwaite)"] <= band[1]
assert band[0] <= fpr["pseudobulk t-test"] <= band[1]
assert fpr["cell-level t-test"] > 5 * band[1]       # the cell-level test is far off
assert bh["mixed model (Satterthwaite)"] == bh["pseudobulk t-test"] == 0 < bh["cell-level t-test"]
"""),
    ("md", r"""
The cell-level t-test calls more than half of the null genes "differentially expressed", and
Benjamini-Hochberg does not rescue it: the FDR control assumes valid p-values, and it still reports
about a thousand discoveries, all false. The mixed model and the pseudobulk test hold their nominal
5%, and neither makes a single discovery at FDR 5%.

## Why: the design effect

The cell-level test's standard error assumes $n$ independent cells. With $m$ cells per donor
and intraclass correlation ρ, the variance of a condition mean is larger by the *design effect*
$1 + (m - 1)\rho$ (Kish 1965) — with $m \approx 50$ and ρ ≈ 0.2 about 11, i.e. standard errors
$\sqrt{11} \approx 3.3$ times too small. The mixed model's standard error for the condition
coefficient contains that factor; compare it with the t-test's own standard error gene by gene:
"""),
    ("code", r"""
se_cells = np.sqrt(Y[stim].var(axis=0, ddof=1) / stim.sum() + Y[~stim].var(axis=0, ddof=1) / (~stim).sum())
ratio = lmm["se"].to_numpy() / se_cells
m_bar = len(obs) / n_donors
deff = 1 + (m_bar - 1) * icc
print(f"median SE ratio (mixed model / cell t-test): {np.median(ratio):.2f}; "
      f"median sqrt(design effect) at the true ICC: {np.median(np.sqrt(deff)):.2f}")
assert np.median(ratio) > 2.5
"""),
    ("md", r"""
## p-value histograms

Under the null, p-values are uniform: a flat histogram at the dashed line. The cell-level test
piles them up near 0; the mixed model's are flat. On the right, the mixed model against the
pseudobulk test gene by gene: with equal cell numbers per donor the two would coincide exactly for
every gene with a positive donor variance (the REML fit then reduces to the analysis of donor
means); with 40–60 cells per donor they are close.
"""),
    ("code", r"""
cells_tab = pd.DataFrame({"estimate": Y[stim].mean(0) - Y[~stim].mean(0), "p": p_cells,
                          "p_adj": stats.false_discovery_control(p_cells)}, index=genes)
fig, axs = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
plots.pvalue_histogram(cells_tab, coef="cell-level t-test", ax=axs[0])
plots.pvalue_histogram(lmm, coef="mixed model", ax=axs[1])
axs[2].scatter(-np.log10(p_pseudo), -np.log10(lmm["p"]), s=4, alpha=0.4)
axs[2].axline((0, 0), slope=1, color="k", lw=0.8)
axs[2].set_xlabel("pseudobulk t-test: -log10 p")
axs[2].set_ylabel("mixed model: -log10 p")
axs[2].set_title("mixed model vs pseudobulk");
"""),
    ("code", r"""
# uniformity: Kolmogorov-Smirnov against U(0, 1)
ks = {name: stats.kstest(p, "uniform").pvalue for name, p in pvals.items()}
assert ks["cell-level t-test"] < 1e-10
pd.Series(ks, name="KS p-value vs uniform")
"""),
    ("md", r"""
**What R would say.** The same per-gene model in R is `lmerTest::lmer(y ~ condition + (1 | donor))`
in a loop over genes (or `dream` in variancePartition, `muscat`'s mixed models); lmmjax's fits of
this design are checked against lme4 + lmerTest gene by gene in `tests/test_batch_reference.py`.
The conclusion does not depend on the software: in a multi-donor design, test the condition
against donor-to-donor variation — with a mixed model or by aggregating to the donor — never
against cell-to-cell variation.
"""),
]

if __name__ == "__main__":
    build("pseudoreplication", CELLS)
