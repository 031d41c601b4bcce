#!/usr/bin/env Rscript
## make_input_cases.R -- lme4 reference values for formulas that R users write and a
## Python reading would get wrong: I(x^2) (a power, not XOR), dotted column names,
## offset(...).  Data: lme4's sleepstudy (identical to lmmjax.datasets "sleepstudy").
## Writes tests/fixtures/input/r_formulas.json.
## Usage (from the repo root): Rscript tests/r/make_input_cases.R
## Needs (Debian): r-cran-lme4 r-cran-jsonlite
suppressPackageStartupMessages({library(lme4); library(jsonlite)})
d <- sleepstudy
d$days.x <- d$Days
d$group.id <- d$Subject
d$z <- d$Days^1.5
d$w <- log(1 + d$Days)
one <- function(f, data) {
  m <- lmer(as.formula(f), data, REML = TRUE,
            control = lmerControl(optimizer = "bobyqa", optCtrl = list(rhoend = 1e-12, maxfun = 1e5)))
  list(formula = f, REML = REMLcrit(m), fixef = as.list(fixef(m)), theta = unname(getME(m, "theta")),
       sigma = sigma(m), fitted = unname(fitted(m)), resid = unname(resid(m)),
       predict_new = unname(predict(m, newdata = data[c(1, 50, 100), ])))
}
out <- list(
  power = one("Reaction ~ Days + I(Days^2) + (Days | Subject)", d),
  dotted = one("Reaction ~ days.x + (days.x | group.id)", d),
  offset = one("Reaction ~ Days + offset(z) + (Days | Subject)", d),
  offset2 = one("Reaction ~ Days + offset(z) + offset(2 * w) + (1 | Subject)", d)
)
dir.create("tests/fixtures/input", showWarnings = FALSE, recursive = TRUE)
writeLines(toJSON(out, digits = NA, auto_unbox = TRUE, pretty = TRUE), "tests/fixtures/input/r_formulas.json")
