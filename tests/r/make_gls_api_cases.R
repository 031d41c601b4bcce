#!/usr/bin/env Rscript
## make_gls_api_cases.R -- nlme reference values for the result API of lmmjax's
## residual-structure fits (GroupedResult: fitted, residuals, predict, ranef, anova F tests,
## intervals, likelihood-ratio tables).
##
## Writes tests/fixtures/gls_api/cases.json and data/BodyWeight.csv (relative to the repo root).
## Orthodont is read from tests/fixtures/reference/data (the shared copy).  (Ovary's
## lme + corAR1 is left out: its 31-row groups make the Python fit compile for ~20 s.)
## Every fit is converged tightly (glsControl/lmeControl tolerances 1e-12) so the fixtures
## carry the optimum, not nlme's default stopping point.
##
## Usage (from the repo root):  Rscript tests/r/make_gls_api_cases.R
## Needs: nlme, jsonlite.

suppressPackageStartupMessages({
  library(nlme)
  library(jsonlite)
})
options(contrasts = c("contr.treatment", "contr.poly"), warn = 1)

out_dir <- "tests/fixtures/gls_api"
dir.create(file.path(out_dir, "data"), recursive = TRUE, showWarnings = FALSE)

orth <- read.csv("tests/fixtures/reference/data/Orthodont.csv")
orth$Sex <- factor(orth$Sex, levels = c("Male", "Female"))
orth$Subject <- factor(orth$Subject, levels = unique(orth$Subject))
bw <- as.data.frame(nlme::BodyWeight)
bw <- data.frame(weight = bw$weight, Time = bw$Time, Rat = as.character(bw$Rat), Diet = as.character(bw$Diet))
write.csv(bw, file.path(out_dir, "data", "BodyWeight.csv"), row.names = FALSE)
bw <- read.csv(file.path(out_dir, "data", "BodyWeight.csv"))
bw$Rat <- factor(bw$Rat, levels = unique(bw$Rat))
bw$Diet <- factor(bw$Diet, levels = c("1", "2", "3"))

gc <- glsControl(tolerance = 1e-12, msTol = 1e-12, maxIter = 500, msMaxIter = 500)
lc <- lmeControl(tolerance = 1e-12, msTol = 1e-12, maxIter = 500, msMaxIter = 500, niterEM = 100,
                 returnObject = TRUE)

# new rows for predict(): existing subjects, new ages, in an order different from the data
orth_new <- data.frame(age = c(9, 13, 8.5, 15), Subject = c("F03", "M05", "M11", "F10"),
                       Sex = c("Female", "Male", "Male", "Female"))
orth_new$Sex <- factor(orth_new$Sex, levels = levels(orth$Sex))
orth_new$Subject <- factor(orth_new$Subject, levels = levels(orth$Subject))
bw_new <- data.frame(Time = c(10, 30, 50), Rat = c("2", "9", "14"), Diet = c("1", "2", "3"))
bw_new$Rat <- factor(bw_new$Rat, levels = levels(bw$Rat))
bw_new$Diet <- factor(bw_new$Diet, levels = levels(bw$Diet))

ftab <- function(a) {
  list(terms = rownames(a), numDF = a[["numDF"]], denDF = if ("denDF" %in% names(a)) a[["denDF"]] else NULL,
       F = a[["F-value"]], p = a[["p-value"]])
}

describe <- function(fit, dataset, newdata, L) {
  is_lme <- inherits(fit, "lme")
  tt <- if (is_lme) summary(fit)$tTable else summary(fit)$tTable
  iv <- if (is_lme) intervals(fit, which = "fixed")$fixed else intervals(fit, which = "coef")$coef
  out <- list(
    dataset = dataset, engine = if (is_lme) "lme" else "gls", REML = fit$method == "REML",
    logLik = as.numeric(logLik(fit)), AIC = AIC(fit), BIC = BIC(fit), sigma = fit$sigma,
    coef = as.list(fixef_or_coef(fit)), se = unname(sqrt(diag(vcov(fit)))),
    df = if (is_lme) unname(tt[, "DF"]) else rep(fit$dims$N - fit$dims$p, length(coef(fit))),
    intervals = list(lower = unname(iv[, "lower"]), est = unname(iv[, "est."]), upper = unname(iv[, "upper"])),
    anova_sequential = ftab(anova(fit)), anova_marginal = ftab(anova(fit, type = "marginal")),
    L = L, anova_L = ftab(anova(fit, L = L)),
    nobs = fit$dims$N
  )
  if (is_lme) {
    out$fitted0 <- unname(fitted(fit, level = 0))
    out$fitted1 <- unname(fitted(fit, level = 1))
    out$residuals1 <- unname(residuals(fit, level = 1))
    out$residuals0 <- unname(residuals(fit, level = 0))
    out$predict0 <- unname(predict(fit, newdata, level = 0))
    out$predict1 <- unname(predict(fit, newdata, level = 1))
    re <- ranef(fit)
    out$ranef <- list(levels = rownames(re), columns = colnames(re), values = unname(as.matrix(re)))
    out$ngroups <- as.list(fit$dims$ngrps[1])
  } else {
    out$fitted <- unname(fitted(fit))
    out$residuals <- unname(residuals(fit))
    out$predict <- unname(predict(fit, newdata))
  }
  out
}
fixef_or_coef <- function(fit) if (inherits(fit, "lme")) fixef(fit) else coef(fit)

lrt <- function(a) {
  list(models = rownames(a), df = a$df, AIC = a$AIC, BIC = a$BIC, logLik = a$logLik,
       L.Ratio = a$L.Ratio, p = a[["p-value"]])
}

f_int <- distance ~ age * Sex
fits <- list(
  orth_gls_ar1 = gls(f_int, orth, correlation = corAR1(form = ~ 1 | Subject), control = gc),
  orth_gls_ar1_varident = gls(f_int, orth, correlation = corAR1(form = ~ 1 | Subject),
                              weights = varIdent(form = ~ 1 | Sex), control = gc),
  orth_gls_ar1_additive = gls(distance ~ age + Sex, orth, correlation = corAR1(form = ~ 1 | Subject), control = gc),
  orth_lme_ar1 = lme(f_int, orth, random = ~ 1 | Subject, correlation = corAR1(form = ~ 1 | Subject), control = lc),
  orth_lme_slope = lme(f_int, orth, random = ~ age | Subject, control = lc),
  bw_lme_varpower = lme(weight ~ Time * Diet, bw, random = ~ Time | Rat, weights = varPower(form = ~ Time),
                        control = lc)
)
specs <- list(
  orth_gls_ar1 = list("orthodont", orth_new, c(0, 1, 0, 0.5)),
  orth_gls_ar1_varident = list("orthodont", orth_new, c(0, 1, 0, 0.5)),
  orth_gls_ar1_additive = list("orthodont", orth_new, c(0, 1, -1)),
  orth_lme_ar1 = list("orthodont", orth_new, c(0, 1, 0, 0.5)),
  orth_lme_slope = list("orthodont", orth_new, c(0, 1, 0, 0.5)),
  bw_lme_varpower = list("bodyweight", bw_new, c(0, 0, 1, -1, 0, 0))
)
cases <- lapply(names(fits), function(nm) {
  s <- specs[[nm]]
  describe(fits[[nm]], s[[1]], s[[2]], s[[3]])
})
names(cases) <- names(fits)

# likelihood-ratio tables, nlme's anova(m1, m2)
ml <- function(fit) update(fit, method = "ML")
lrts <- list(
  gls_ar1_vs_varident_reml = lrt(anova(fits$orth_gls_ar1, fits$orth_gls_ar1_varident)),
  gls_ar1_vs_lme_ar1_reml = lrt(anova(fits$orth_gls_ar1, fits$orth_lme_ar1)),
  lme_slope_vs_lme_ar1_reml = lrt(anova(fits$orth_lme_ar1, fits$orth_lme_slope)),
  # different fixed effects: nlme warns for REML, so compare the ML fits
  lme_slope_vs_gls_ar1_additive_ml = lrt(anova(ml(fits$orth_gls_ar1_additive), ml(fits$orth_lme_slope)))
)

write(toJSON(list(nlme_version = as.character(packageVersion("nlme")), R_version = R.version.string,
                  newdata = list(orthodont = orth_new, bodyweight = bw_new),
                  cases = cases, lrt = lrts),
             digits = NA, auto_unbox = TRUE, null = "null", na = "null", pretty = TRUE),
      file.path(out_dir, "cases.json"))
cat("wrote", file.path(out_dir, "cases.json"), "\n")
