#!/usr/bin/env Rscript
## Type I (sequential) anova tables from lmerTest for a few lme4 cases.
## Usage (repo root): Rscript tests/r/make_anova_type1.R
## Writes tests/fixtures/extra/anova_type1.json. Reads the case JSONs for formula,
## data set and factor level order.
suppressPackageStartupMessages({ library(lmerTest); library(jsonlite) })
options(contrasts = c("contr.treatment", "contr.poly"))
cases <- c("extra/cases/sim_factor_interactions_reml.json",
           "reference/cases/orthodont_lmer_age_sex_reml.json",
           "extra/cases/cake_reml.json")
out <- list()
for (f in cases) {
  cs <- fromJSON(file.path("tests/fixtures", f))
  dat <- read.csv(file.path("tests/fixtures", dirname(dirname(f)), "data", cs$dataset),
                  stringsAsFactors = FALSE, check.names = FALSE)
  for (v in names(cs$factor_levels))
    dat[[v]] <- factor(as.character(dat[[v]]), levels = cs$factor_levels[[v]])
  fit <- lmer(as.formula(cs$formula), data = dat, REML = cs$REML,
              control = lmerControl(optimizer = "bobyqa", optCtrl = list(rhoend = 1e-12, maxfun = 1e6)))
  res <- list()
  for (ddf in c("Satterthwaite", "Kenward-Roger")) {
    a <- anova(fit, type = 1, ddf = ddf)
    res[[ddf]] <- data.frame(term = rownames(a), NumDF = a$NumDF, DenDF = a$DenDF,
                             F = a[["F value"]], p = a[["Pr(>F)"]])
  }
  out[[cs$case]] <- list(formula = cs$formula, control = "bobyqa rhoend=1e-12", anova_type1 = res)
}
write_json(out, "tests/fixtures/extra/anova_type1.json", digits = NA, pretty = TRUE, auto_unbox = TRUE)
cat("wrote tests/fixtures/extra/anova_type1.json\n")
