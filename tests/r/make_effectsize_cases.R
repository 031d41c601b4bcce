#!/usr/bin/env Rscript
## make_effectsize_cases.R -- reference values for lmmjax.effectsize (r2, icc, variances).
##
## Fits lme4 models and records what performance::r2_nakagawa and performance::icc report,
## with the variance components insight::get_variance used (var.fixed, var.random,
## var.residual), and -- for every case -- the random-effect variance of Johnson (2014)
## computed here directly from the per-term model matrices (getME(fit, "mmList")):
##     var_random_johnson = sum_k mean_i z_ik' Sigma_k z_ik.
## For the usual models the two random variances agree.  They differ where performance
## departs from Johnson: a grouping factor that appears in several terms ((x || g),
## (1 | g) + (0 + x | g)) contributes only its first term to performance's var.random.
##
## Writes tests/fixtures/effectsize/cases.json and oats.csv (nlme's Oats, the one data set
## lmmjax does not bundle); every model of Oats is fitted to the CSV as read back.
##
## Usage (from the repo root):  Rscript tests/r/make_effectsize_cases.R
## Needs: lme4, nlme, performance (0.10.2 used), insight (0.19.0 used), jsonlite.

suppressPackageStartupMessages({
  library(lme4)
  library(performance)
  library(jsonlite)
})
options(contrasts = c("contr.treatment", "contr.poly"), warn = 1)

script_dir <- local({
  a <- grep("^--file=", commandArgs(FALSE), value = TRUE)
  if (length(a)) dirname(normalizePath(sub("^--file=", "", a[1]))) else getwd()
})
out_dir <- file.path(dirname(script_dir), "fixtures", "effectsize")
dir.create(out_dir, showWarnings = FALSE, recursive = TRUE)

## ----------------------------------------------------------------- data
oats <- as.data.frame(nlme::Oats)
oats$Block <- as.character(oats$Block)
oats$Variety <- as.character(oats$Variety)
write.csv(oats[, c("Block", "Variety", "nitro", "yield")], file.path(out_dir, "oats.csv"),
          row.names = FALSE)
oats <- read.csv(file.path(out_dir, "oats.csv"), stringsAsFactors = TRUE)

orthodont <- as.data.frame(nlme::Orthodont)
orthodont$Subject <- factor(as.character(orthodont$Subject))

datasets <- list(sleepstudy = sleepstudy, penicillin = Penicillin, pastes = Pastes,
                 orthodont = orthodont, dyestuff = Dyestuff, dyestuff2 = Dyestuff2, oats = oats)

## ----------------------------------------------------------------- cases
cases <- list(
  list(name = "sleepstudy_intercept", data = "sleepstudy", reml = TRUE,
       formula = "Reaction ~ Days + (1 | Subject)"),
  list(name = "sleepstudy_slopes", data = "sleepstudy", reml = TRUE,
       formula = "Reaction ~ Days + (Days | Subject)"),
  list(name = "sleepstudy_slopes_ml", data = "sleepstudy", reml = FALSE,
       formula = "Reaction ~ Days + (Days | Subject)"),
  list(name = "penicillin_crossed", data = "penicillin", reml = TRUE,
       formula = "diameter ~ 1 + (1 | plate) + (1 | sample)"),
  list(name = "oats_factorial", data = "oats", reml = TRUE,
       formula = "yield ~ Variety * factor(nitro) + (1 | Block)"),
  list(name = "pastes_nested", data = "pastes", reml = TRUE,
       formula = "strength ~ 1 + (1 | batch/cask)"),
  list(name = "orthodont_slopes", data = "orthodont", reml = TRUE,
       formula = "distance ~ age * Sex + (age | Subject)"),
  list(name = "dyestuff_intercept_only", data = "dyestuff", reml = TRUE,
       formula = "Yield ~ 1 + (1 | Batch)"),
  ## singular (theta = 0): performance reports conditional R2 and both ICCs as NA
  list(name = "dyestuff2_singular", data = "dyestuff2", reml = TRUE,
       formula = "Yield ~ 1 + (1 | Batch)"),
  ## performance counts only the first term of a repeated grouping factor
  list(name = "sleepstudy_uncorrelated", data = "sleepstudy", reml = TRUE,
       formula = "Reaction ~ Days + (Days || Subject)")
)

num <- function(x) if (is.null(x) || length(x) == 0 || is.na(x)) NA_real_ else unname(as.numeric(x))

johnson_random <- function(fit) {
  mm <- getME(fit, "mmList")
  vc <- VarCorr(fit)             # same term order as mmList
  stopifnot(length(mm) == length(vc))
  sum(mapply(function(Z, S) mean(rowSums((Z %*% S) * Z)), mm, lapply(vc, as.matrix)))
}

out <- lapply(cases, function(cs) {
  fit <- lmer(as.formula(cs$formula), data = datasets[[cs$data]], REML = cs$reml)
  v <- suppressWarnings(insight::get_variance(fit))
  r2 <- suppressWarnings(r2_nakagawa(fit))
  ic <- suppressWarnings(icc(fit))
  has_icc <- is.data.frame(ic)
  Xb <- as.vector(getME(fit, "X") %*% fixef(fit))
  c(cs, list(
    nobs = nobs(fit),
    singular = isSingular(fit, tol = 1e-5),
    theta = I(unname(getME(fit, "theta"))),
    sigma = sigma(fit),
    r2_marginal = num(r2$R2_marginal),
    r2_conditional = num(r2$R2_conditional),
    icc_adjusted = if (has_icc) num(ic$ICC_adjusted) else NA_real_,
    icc_conditional = if (has_icc) num(ic$ICC_conditional) else NA_real_,
    var_fixed = num(v$var.fixed),
    var_random = num(v$var.random),
    var_residual = num(v$var.residual),
    var_fixed_direct = var(Xb),
    var_random_johnson = johnson_random(fit)
  ))
})
names(out) <- vapply(cases, `[[`, "", "name")

meta <- list(
  generated_by = "tests/r/make_effectsize_cases.R",
  R = R.version.string,
  lme4 = as.character(packageVersion("lme4")),
  performance = as.character(packageVersion("performance")),
  insight = as.character(packageVersion("insight"))
)
writeLines(toJSON(list(meta = meta, cases = out), auto_unbox = TRUE, digits = NA, na = "null",
                  pretty = TRUE),
           file.path(out_dir, "cases.json"))
cat("wrote", file.path(out_dir, "cases.json"), "\n")
