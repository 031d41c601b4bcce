"""Builds and executes notebooks/simulation_power.ipynb: `python notebooks/_make_simulation_power.py`."""
from _make_quickstart import build

CELLS = [
    ("md", r"""
# Simulation: parameter recovery and a power curve

The classic exercise for a longitudinal mixed model, in the order one would do it with lme4 and
simr:

1. simulate one study from known parameters and fit it;
2. check that the fit recovers the parameters — once, and over many simulated studies (bias, and
   whether the 95% confidence interval covers the truth 95% of the time);
3. ask how many subjects a study needs to detect a smaller slope: power by simulation (simr's
   `powerSim`/`powerCurve`), checked against the closed form this balanced design allows.

The model: 50 subjects measured at 5 occasions, $t = 0, \dots, 4$,

$$y_{ij} = (\beta_0 + b_{0i}) + (\beta_1 + b_{1i})\,t_j + \varepsilon_{ij},\qquad
\begin{pmatrix}b_{0i}\\ b_{1i}\end{pmatrix}\sim N\!\left(0, \begin{pmatrix}10^2 & 5\\ 5 & 2^2\end{pmatrix}\right),
\quad \varepsilon_{ij}\sim N(0, 5^2),$$

with $\beta_0 = 50$, $\beta_1 = 3$: random-intercept SD 10, random-slope SD 2, intercept–slope
covariance 5 (correlation 0.25), residual SD 5. In lme4: `lmer(y ~ time + (time | subject))`.
"""),
    ("code", r"""
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy import stats

import lmmjax

pd.set_option("display.width", 120)

beta = pd.Series({"(Intercept)": 50.0, "time": 3.0})
Sigma = np.array([[10.0**2, 5.0],
                  [5.0, 2.0**2]])                    # Var(b0), Cov(b0, b1); Cov(b1, b0), Var(b1)
sigma = 5.0
n_occasions = 5


def design(n_subjects):
    # the covariates of a balanced study: every subject at t = 0, ..., 4
    return pd.DataFrame({
        "subject": pd.Categorical(np.repeat([f"s{i:02d}" for i in range(n_subjects)], n_occasions)),
        "time": np.tile(np.arange(n_occasions, dtype=float), n_subjects)})


def simulate(d, nsim, rng):
    # (rows, nsim) responses: y = b0 + b1 t + (b0_i + b1_i t) + e, new subjects in every column
    s, t = d["subject"].cat.codes.to_numpy(), d["time"].to_numpy()
    b = rng.multivariate_normal([0.0, 0.0], Sigma, size=(nsim, d["subject"].nunique()))   # (nsim, subjects, 2)
    eta = beta["(Intercept)"] + b[:, s, 0] + (beta["time"] + b[:, s, 1]) * t
    return eta.T + sigma * rng.standard_normal((len(d), nsim))


rng = np.random.default_rng(2024)
data = design(50)
data["y"] = simulate(data, 1, rng)[:, 0]
data.head(6)
"""),
    ("md", r"""
## 1. One study

Fit by REML, as `lmer` does by default; the summary shows lmerTest's Satterthwaite df (49 for
both coefficients: in this balanced design each is effectively a one-sample t test over 50
subjects).
"""),
    ("code", r"""
m = lmmjax.lmer("y ~ time + (time | subject)", data)
m.summary()
"""),
    ("md", r"""
## 2. Did the fit recover the truth?

For the fixed effects: is the estimate within 2 standard errors of the truth? For the variance
parameters, whose sampling distributions are skewed, a Wald interval is a poor guide; use the
profile-likelihood interval, lme4's `confint(fit)` (on the SD / correlation / σ scale; lme4 profiles
the ML deviance, and so does `m.confint()`).

The seed above is the first one we tried, not one picked to make the table look good. Each check is
at 2 SE or 95%, so for any given seed one of the six fails now and then (roughly 1 time in 20 each)
— that would be sampling variation, not a bug. The repeated simulation below is the real test.
"""),
    ("code", r"""
ci = m.confint()                                     # profile intervals (lme4's confint default)
vc = m.varcorr.set_index(["group", "term1", "term2"])["sdcor"]
ct = m.coef_table()
truth = pd.Series({"sd_(Intercept)|subject": 10.0, "cor_time.(Intercept)|subject": Sigma[0, 1] / (10.0 * 2.0),
                   "sd_time|subject": 2.0, "sigma": sigma, **beta})
estimate = pd.Series({"sd_(Intercept)|subject": vc["subject", "(Intercept)", None],
                      "cor_time.(Intercept)|subject": vc["subject", "(Intercept)", "time"],
                      "sd_time|subject": vc["subject", "time", None], "sigma": m.sigma, **m.fixef})
recovery = pd.DataFrame({"truth": truth, "estimate": estimate, "se": ct["se"].reindex(truth.index),
                         "profile 2.5%": ci["lower"], "profile 97.5%": ci["upper"]})
recovery["(estimate - truth) / se"] = (recovery["estimate"] - recovery["truth"]) / recovery["se"]
recovery["truth in profile CI"] = recovery["truth"].between(recovery["profile 2.5%"], recovery["profile 97.5%"])
recovery.round(3)
"""),
    ("code", r"""
assert m.converged and not m.is_singular
fixed = list(beta.index)
assert (recovery.loc[fixed, "(estimate - truth) / se"].abs() < 2).all()     # fixed effects within 2 SE
assert recovery.drop(fixed).loc[:, "truth in profile CI"].all()             # variance parameters in their CI
assert recovery["truth in profile CI"].all()                                # and the fixed effects' too
np.testing.assert_allclose(m.sigma, recovery.loc["sigma", "estimate"])
"""),
    ("md", r"""
All six hold for this seed. The slope is the tightest call: 1.8 SE above the truth.

### 400 studies at once

One study says little about an estimator. Simulate 400 studies from the same model and refit them
all with `lmmjax.lmer_batch`, which takes the design once and the 400 response vectors as the
columns of a matrix, and fits them in one compiled program (in R: a loop over `simulate(fit, 400)`
with `refit`, as `bootMer` does). Two questions:

* **bias**: is the average estimate the truth? The fixed effects are unbiased here (β̂ is symmetric
  around β); REML variance estimates are close to unbiased when they stay off the boundary, while
  SDs, the square roots, are a little biased downwards (Jensen).
* **coverage**: does the 95% Satterthwaite interval for the slope contain 3 in 95% of studies? With
  400 studies, a calibrated interval's coverage falls in the 99% binomial band below 99 times in
  100.
"""),
    ("code", r"""
nsim = 400
Y = simulate(data, nsim, np.random.default_rng(1))
fits = lmmjax.lmer_batch("~ time + (time | subject)", data, Y, progress=False)
print(fits)

vcs = fits.varcorr().set_index(["response", "group", "term1", "term2"])
def component(group, term1, term2, col="sdcor"):
    return vcs[col].xs((group, term1, term2), level=["group", "term1", "term2"]).to_numpy()

draws = pd.DataFrame({"sd_(Intercept)|subject": component("subject", "(Intercept)", None),
                      "cor_time.(Intercept)|subject": component("subject", "(Intercept)", "time"),
                      "sd_time|subject": component("subject", "time", None),
                      "sigma": fits.sigma.to_numpy(), **{k: fits.fixef[k].to_numpy() for k in beta.index}})
variances = pd.DataFrame({"var_(Intercept)|subject": component("subject", "(Intercept)", None, "vcov"),
                          "cov_(Intercept).time|subject": component("subject", "(Intercept)", "time", "vcov"),
                          "var_time|subject": component("subject", "time", None, "vcov"),
                          "sigma^2": fits.sigma.to_numpy() ** 2})
true_var = pd.Series([Sigma[0, 0], Sigma[0, 1], Sigma[1, 1], sigma**2], index=variances.columns)
allt = pd.concat([truth, true_var])
alld = pd.concat([draws, variances], axis=1)
mean = alld.mean()
mc_se = alld.std(ddof=1) / np.sqrt(nsim)                 # Monte-Carlo SE of the mean
bias_table = pd.DataFrame({"truth": allt, "mean estimate": mean, "bias": mean - allt,
                           "Monte-Carlo SE": mc_se, "bias / MC SE": (mean - allt) / mc_se,
                           "SD of estimates": alld.std(ddof=1)})
bias_table.round(3)
"""),
    ("md", r"""
The fixed effects, the slope variance, the covariance and σ² are within one Monte-Carlo SE of the
truth. The intercept variance is 2.6 Monte-Carlo SEs low (97.2 against 100), and the intercept SD and
the correlation, nonlinear functions of it, move with it (the SDs would sit a little low anyway, as
square roots of unbiased variances do). Bias of REML, or these 400 studies? In this balanced design REML has a closed form whenever the fit is not singular: the
sample covariance of the subjects' own least-squares coefficients minus σ̂²(XᵢᵀXᵢ)⁻¹ (σ̂² the pooled
within-subject residual variance), the classical moment estimator, which is exactly unbiased.
The 400 fits reproduce it:
"""),
    ("code", r"""
t_occ = np.arange(n_occasions, dtype=float)
Xi = np.column_stack([np.ones(n_occasions), t_occ])              # one subject's design
Yr = Y.reshape(50, n_occasions, nsim)                            # rows are subject-major: (subject, occasion, study)
coefs = np.einsum("pj,ijk->ikp", np.linalg.pinv(Xi), Yr)         # each subject's OLS (intercept, slope)
resid = Yr - np.einsum("jp,ikp->ijk", Xi, coefs)
s2 = np.sum(resid**2, axis=(0, 1)) / (50 * (n_occasions - 2))    # pooled within-subject variance
dev = coefs - coefs.mean(axis=0)
moment = np.einsum("ikp,ikq->kpq", dev, dev) / 49 - s2[:, None, None] * np.linalg.inv(Xi.T @ Xi)
regular = ~fits.is_singular.to_numpy()
reml = variances.iloc[:, :3].to_numpy()
mom = np.column_stack([moment[:, 0, 0], moment[:, 0, 1], moment[:, 1, 1]])
rel_cov = np.max(np.abs(reml - mom)[regular] / np.abs(mom[regular]).max(axis=0))   # relative to each column's scale
rel_s2 = np.max(np.abs(fits.sigma.to_numpy() ** 2 - s2)[regular] / s2[regular])
print(f"{regular.sum()} non-singular fits; max relative difference REML vs moment estimator: "
      f"{rel_cov:.1e} (covariances), {rel_s2:.1e} (sigma^2)")
assert rel_cov < 1e-7 and rel_s2 < 1e-7
"""),
    ("md", r"""
So the shortfall is in the simulated data sets themselves (a 2.6-SE deviation happens about once
in 100 for one quantity, once in 25 for the largest of four), not in the fitting. Now the slope's
confidence interval:
"""),
    ("code", r"""
slope = fits.coef_table("time", ddf="satterthwaite")
covered = slope["lower"].le(beta["time"]) & slope["upper"].ge(beta["time"])
coverage = covered.mean()
band = np.array(stats.binom.interval(0.99, nsim, 0.95)) / nsim
print(f"converged: {int(fits.converged.sum())} of {nsim}, singular: {int(fits.is_singular.sum())}")
print(f"coverage of the 95% Satterthwaite CI for the slope: {coverage:.1%} "
      f"(99% binomial band for a calibrated interval: [{band[0]:.1%}, {band[1]:.1%}])")
print(f"mean SE {slope['se'].mean():.4f} vs SD of the slope estimates {draws['time'].std(ddof=1):.4f}; "
      f"Satterthwaite df: {slope['df'].min():.2f} to {slope['df'].max():.2f}")

assert fits.converged.all()
assert band[0] <= coverage <= band[1]
assert (bias_table.loc[fixed, "bias / MC SE"].abs() < 3).all()          # unbiased fixed effects
assert (bias_table.loc[true_var.index, "bias / MC SE"].abs() < 3).all()  # and variances, at 3 Monte-Carlo SE
"""),
    ("code", r"""
fig, axs = plt.subplots(1, 6, figsize=(15, 2.6), constrained_layout=True)
for ax, name in zip(axs, draws.columns):
    ax.hist(draws[name], bins=30, color="0.75")
    ax.axvline(truth[name], color="C3", lw=2, label="truth")
    ax.axvline(draws[name].mean(), color="k", ls="--", lw=1, label="mean estimate")
    ax.set_title(name.replace("|subject", ""), fontsize=9)
    ax.set_yticks([])
axs[0].legend(fontsize=7, loc="upper left")
fig.suptitle(f"{nsim} REML fits of y ~ time + (time | subject), 50 subjects x 5 occasions", fontsize=10);
"""),
    ("md", r"""
The slope's interval covers the truth at its nominal rate: its SEs are the right size (their mean
is close to the SD of the 400 estimates) and so are its Satterthwaite df (49 in every fit).

## 3. Power to detect a smaller slope

Suppose the smallest slope worth detecting is $\beta_1 = 1$ per occasion, not 3. How likely is a
study to find it (two-sided test at α = 0.05)?

**From the fit**, as simr's `powerSim(fit, test = fixed("time"))` after `fixef(fit)["time"] <- 1`:
`lmmjax.power(m, fixef={"time": 1})` simulates from the fitted model (its design, θ̂ and σ̂, with
the slope replaced), refits every simulated study in one `lmer_batch` run and counts the
Satterthwaite p-values below 0.05; `lower`/`upper` are a Clopper-Pearson interval for the
simulation's uncertainty about the power.
"""),
    ("code", r"""
pw_fit = lmmjax.power(m, test="time", fixef={"time": 1.0}, nsim=nsim, seed=11, level=0.99)
pw_fit
"""),
    ("md", r"""
### The closed form

For this design the simulation has an exact answer to be checked against. With every subject
measured at the same occasions and an unstructured random-effects covariance, the REML estimate
of the mean slope is the average of the subjects' own least-squares slopes, and its Satterthwaite
t test *is* the one-sample t test on those slopes (whenever the fit is not singular; then the df
are exactly $n - 1$). Each subject's least-squares slope has variance
$\sigma_{b_1}^2 + \sigma^2 / S_{xx}$, with $S_{xx} = \sum_j (t_j - \bar t)^2 = 10$, so

$$\widehat{\beta}_1 \sim N\!\left(\beta_1,\ \frac{\sigma_{b_1}^2 + \sigma^2/S_{xx}}{n}\right),
\qquad \text{power} = P\left(|T_{n-1}(\delta)| > t_{n-1,\,0.975}\right),\quad
\delta = \frac{\beta_1}{\sqrt{(\sigma_{b_1}^2 + \sigma^2/S_{xx})/n}},$$

a noncentral t probability (`scipy.stats.nct`). First the premise, on the 400 studies of section 2:
the t statistic of each non-singular fit against the one-sample t test of its subjects' slopes.
"""),
    ("code", r"""
Sxx = np.sum((t_occ - t_occ.mean()) ** 2)
t_slopes = stats.ttest_1samp(coefs[:, :, 1], 0.0, axis=0)        # one-sample t test of the subjects' slopes
diff = np.abs(slope["t"].to_numpy() - t_slopes.statistic)[regular]
print(f"{regular.sum()} non-singular fits: max |t(lmer) - t(slopes)| = {diff.max():.2e}, "
      f"df {np.unique(slope['df'].to_numpy()[regular].round(6))}")
assert diff.max() < 1e-7 * np.abs(t_slopes.statistic).max()
np.testing.assert_allclose(slope["df"].to_numpy()[regular], 49, rtol=1e-6)


def closed_form_power(n, slope, var_slope, resid_var, alpha=0.05):
    se = np.sqrt((var_slope + resid_var / Sxx) / n)
    df = n - 1
    crit = stats.t.ppf(1 - alpha / 2, df)
    return stats.nct.sf(crit, df, slope / se) + stats.nct.cdf(-crit, df, slope / se)


# the fit-based power uses the fitted parameters, so its closed form does too
vc_fit = m.varcorr.set_index(["group", "term1", "term2"])["vcov"]
exact_fit = closed_form_power(50, 1.0, vc_fit["subject", "time", None], m.sigma**2)
print(f"power from the fit: simulated {pw_fit.power:.3f} [{pw_fit.lower:.3f}, {pw_fit.upper:.3f}], "
      f"closed form {exact_fit:.3f}")
assert pw_fit.lower <= exact_fit <= pw_fit.upper
"""),
    ("md", r"""
### A power curve

**From the design**, as simr's `powerCurve(extend(fit, along = "subject", n = 50), breaks = ...)`
— but without a pilot fit: `lmmjax.power(formula, data, fixef=..., covariance=..., sigma=...)`
takes the covariates of the planned study and the true parameters (here those of section 1 with
$\beta_1 = 1$). Four study sizes, 400 simulated studies each, 99% simulation intervals:
"""),
    ("code", r"""
sizes = [10, 20, 30, 50]
curve = {}
for n in sizes:
    pr = lmmjax.power("~ time + (time | subject)", design(n), test="time",
                      fixef={"(Intercept)": 50.0, "time": 1.0}, covariance={"subject": Sigma}, sigma=sigma,
                      nsim=nsim, seed=n, level=0.99)
    curve[n] = {"power": pr.power, "lower 99%": pr.lower, "upper 99%": pr.upper,
                "closed form": closed_form_power(n, 1.0, Sigma[1, 1], sigma**2),
                "singular fits": int(pr.fits.is_singular.sum()), "failed": pr.n_failed}
curve = pd.DataFrame.from_dict(curve, orient="index").rename_axis("subjects")
curve.round(3)
"""),
    ("code", r"""
assert (curve["failed"] == 0).all()
assert ((curve["lower 99%"] <= curve["closed form"]) & (curve["closed form"] <= curve["upper 99%"])).all()
assert curve["power"].is_monotonic_increasing

grid = np.arange(5, 81)
exact = closed_form_power(grid, 1.0, Sigma[1, 1], sigma**2)
n80 = int(grid[np.argmax(exact >= 0.8)])
fig, ax = plt.subplots(figsize=(6.5, 4))
ax.plot(grid, exact, color="0.4", lw=1, label="closed form (noncentral t)")
ax.errorbar(curve.index, curve["power"], yerr=[curve["power"] - curve["lower 99%"], curve["upper 99%"] - curve["power"]],
            fmt="o", color="C0", capsize=4, label=f"simulation ({nsim} studies, 99% CI)")
ax.axhline(0.8, color="C3", ls=":", lw=1)
ax.axvline(n80, color="C3", ls=":", lw=1)
ax.set_xlabel("subjects (5 occasions each)")
ax.set_ylabel("power, slope = 1, alpha = 0.05")
ax.set_ylim(0, 1)
ax.legend(loc="lower right")
print(f"80% power needs {n80} subjects (closed form)")
assert 50 < n80 <= 80
"""),
    ("md", r"""
The simulated power agrees with the closed form at every size: about 20% with 10 subjects, 77%
with 50, and 80% needs a few more subjects than the 50 of the pilot design. At 10 subjects a
sizeable share of the fits is singular (the 2 × 2 random-effects covariance estimated on its
boundary); there the mixed-model test and the slopes' t test part ways, but not by enough to move
the power outside the simulation interval.

**Why simulate, if there is a closed form?** Because there usually is none: unbalanced or missing
occasions, dropout, a categorical time, crossed random effects, a Kenward-Roger test
(`ddf="kenward-roger"`), or a sample size that varies per cluster all break the one-sample-t
equivalence, and `lmmjax.power` handles them the same way — a design, the parameters, `nsim`
refits in one batch. The closed form here only serves to show that the simulation machinery gets
the right answer where the answer is known.
"""),
]

if __name__ == "__main__":
    build("simulation_power", CELLS)
