#!/usr/bin/env Rscript
## make_weights_cases.R -- lme4 / lmerTest reference values for prior weights
## (lmer(..., weights = w): Var(e_i) = sigma^2 / w_i), for lmmjax's weights= in lmer and
## lmer_batch, and variance fractions computed from lme4's VarCorr and fixef as
## variancePartition's calcVarPart does (vp() below).  Writes tests/fixtures/weights/weights.json.
## Usage (from the repo root): Rscript tests/r/make_weights_cases.R
## Needs (Debian): r-cran-lme4 r-cran-lmertest r-cran-jsonlite
suppressPackageStartupMessages({library(lme4); library(lmerTest); library(jsonlite)})
ctrl <- lmerControl(optimizer = "bobyqa", optCtrl = list(rhoend = 1e-12, maxfun = 1e5))
set.seed(11)
ss <- sleepstudy
ss$w <- round(runif(nrow(ss), 0.2, 3), 4)
pen <- Penicillin
pen$w <- round(rexp(nrow(pen)) + 0.1, 4)

## variancePartition::calcVarPart for an lmerMod, from VarCorr, fixef and the weights:
## random-effect column variances, fixed-effect columns' shares of the fixed part's
## (weighted, population) variance, residual sigma^2; divided by their sum
vp <- function(m) {
  w <- weights(m); N <- length(w)
  wvar <- function(x) { v <- w * N / sum(w); sum(v * (x - sum(v * x) / sum(v))^2) / N }
  comp <- unlist(lapply(VarCorr(m), function(v) attr(v, "stddev")^2))
  names(comp) <- gsub("\\.\\(Intercept\\)", "", names(comp))
  X <- getME(m, "X"); idx <- which(colnames(X) != "(Intercept)")
  if (length(idx)) {
    fx <- sapply(idx, function(i) X[, i] * fixef(m)[i])
    own <- apply(fx, 2, wvar)
    comp <- c(comp, setNames(own / sum(own) * wvar(rowSums(fx)), colnames(X)[idx]))
  }
  comp <- c(comp, Residuals = sigma(m)^2)
  as.list(comp / sum(comp))
}

one <- function(f, data, reml, wcol) {
  data$.w <- data[[wcol]]
  m <- lmer(as.formula(f), data, REML = reml, weights = .w, control = ctrl)
  ct <- summary(m)$coefficients
  list(formula = f, weights = wcol, REML = reml, criterion = if (reml) REMLcrit(m) else deviance(m),
       logLik = as.numeric(logLik(m)), fixef = as.list(fixef(m)), se = unname(ct[, "Std. Error"]),
       df = unname(ct[, "df"]), p = unname(ct[, "Pr(>|t|)"]), theta = unname(getME(m, "theta")),
       sigma = sigma(m), fitted = unname(fitted(m)), resid = unname(resid(m)), varpart = vp(m))
}
single <- list(
  sleep_reml = one("Reaction ~ Days + (Days | Subject)", ss, TRUE, "w"),
  sleep_ml = one("Reaction ~ Days + (Days | Subject)", ss, FALSE, "w"),
  sleep_int = one("Reaction ~ Days + (1 | Subject)", ss, TRUE, "w"),
  penicillin = one("diameter ~ 1 + (1 | plate) + (1 | sample)", pen, TRUE, "w"),
  sleep_unweighted = one("Reaction ~ Days + (Days | Subject)", transform(ss, one = 1), TRUE, "one")
)

## Kenward-Roger under prior weights: pbkrtest builds Sigma = ZGZ' + sigma^2 I and ignores the
## weights (its KR for lmer(..., weights = w) is that of another model), so the reference is
## pbkrtest on the equivalent unweighted model of the sqrt(w)-scaled rows (same REML criterion
## up to sum(log w), same estimates)
ss$sw <- sqrt(ss$w); ss$yw <- ss$Reaction * ss$sw; ss$dw <- ss$Days * ss$sw
mt <- lmer(yw ~ 0 + sw + dw + (0 + sw + dw | Subject), ss, control = ctrl)
ctt <- summary(mt, ddf = "Kenward-Roger")$coefficients
kr_weighted <- list(formula = "Reaction ~ Days + (Days | Subject)", weights = "w",
                    criterion = REMLcrit(mt) - sum(log(ss$w)), se = unname(ctt[, "Std. Error"]),
                    df = unname(ctt[, "df"]))
ss$sw <- NULL; ss$yw <- NULL; ss$dw <- NULL

## profile intervals of the variance parameters under weights (lme4's fixed-effect profiles
## with weights are non-monotonic and fall back to linear interpolation: not used)
mi <- lmer(Reaction ~ Days + (1 | Subject), ss, weights = w, control = ctrl)
pci <- suppressWarnings(suppressMessages(confint(mi, parm = 1:2, oldNames = FALSE)))
profile_weighted <- list(formula = "Reaction ~ Days + (1 | Subject)", weights = "w",
                         lower = unname(pci[, 1]), upper = unname(pci[, 2]))

## batch: 40 cells in 8 donors (4 per condition), 6 genes, per-gene (voom-like) weights
set.seed(12)
n <- 48
obs <- data.frame(donor = factor(rep(sprintf("d%d", 1:8), each = 6)),
                  cond = factor(rep(c("ctrl", "stim"), each = 24)),
                  x = round(rnorm(n), 4))
G <- 6
Y <- matrix(NA_real_, n, G)
Wt <- matrix(NA_real_, n, G)
u <- matrix(rnorm(8 * G, sd = 0.7), 8, G)
for (g in 1:G) {
  Wt[, g] <- round(runif(n, 0.3, 2.5), 4)
  Y[, g] <- round(5 + 0.4 * (g %% 3) * (obs$cond == "stim") + 0.2 * obs$x + u[as.integer(obs$donor), g] +
                  rnorm(n, sd = 1 / sqrt(Wt[, g])), 4)
}
shared_w <- round(runif(n, 0.5, 2), 4)
batch_fit <- function(wmat) {
  lapply(1:G, function(g) {
    d <- obs; d$y <- Y[, g]; d$.w <- wmat[, g]
    m <- lmer(y ~ cond + x + (1 | donor), d, weights = .w, control = ctrl)
    ct <- summary(m)$coefficients
    list(criterion = REMLcrit(m), fixef = unname(fixef(m)), se = unname(ct[, "Std. Error"]),
         df = unname(ct[, "df"]), p = unname(ct[, "Pr(>|t|)"]), theta = unname(getME(m, "theta")),
         sigma = sigma(m), varpart = vp(m))
  })
}
batch <- list(formula = "~ cond + x + (1 | donor)", obs = obs, Y = Y, W = Wt, shared_w = shared_w,
              coef_names = names(fixef(lmer(Y[, 1] ~ cond + x + (1 | donor), obs))),
              per_gene = batch_fit(Wt), shared = batch_fit(matrix(shared_w, n, G)))
out <- list(data = list(sleepstudy = ss, penicillin = pen), single = single, batch = batch,
            kr_weighted = kr_weighted, profile_weighted = profile_weighted,
            versions = list(lme4 = as.character(packageVersion("lme4")),
                            lmerTest = as.character(packageVersion("lmerTest"))))
dir.create("tests/fixtures/weights", showWarnings = FALSE, recursive = TRUE)
writeLines(toJSON(out, digits = NA, auto_unbox = TRUE, pretty = FALSE, dataframe = "columns"),
           "tests/fixtures/weights/weights.json")
