#!/usr/bin/env Rscript
## Estimated marginal means and contrasts from emmeans (lmer.df = "satterthwaite",
## "kenward-roger", "asymptotic") for lmmjax's tests/test_emmeans.py.
## Usage (repo root): Rscript tests/r/make_emmeans_cases.R
## Writes tests/fixtures/emmeans/emmeans.json and tests/fixtures/emmeans/oats.csv (nlme's Oats).
## Fits use bobyqa with rhoend = 1e-12 so that R's optimum is lmmjax's to many digits.
suppressPackageStartupMessages({
  library(lme4); library(lmerTest); library(pbkrtest); library(emmeans); library(nlme); library(jsonlite)
})
options(contrasts = c("contr.treatment", "contr.poly"))
emm_options(pbkrtest.limit = 1e5, lmerTest.limit = 1e5)
ctrl <- lmerControl(optimizer = "bobyqa", optCtrl = list(rhoend = 1e-12, maxfun = 1e6))
outdir <- "tests/fixtures/emmeans"

## data
orth <- as.data.frame(nlme::Orthodont)
orth$Subject <- factor(as.character(orth$Subject))
orth$Sex <- factor(as.character(orth$Sex), levels = c("Male", "Female"))
oats <- as.data.frame(nlme::Oats)
oats$Block <- factor(as.character(oats$Block), levels = c("I", "II", "III", "IV", "V", "VI"))
oats$Variety <- factor(as.character(oats$Variety), levels = c("Golden Rain", "Marvellous", "Victory"))
write.csv(oats[, c("Block", "Variety", "nitro", "yield")], file.path(outdir, "oats.csv"), row.names = FALSE)
cake <- read.csv("tests/fixtures/extra/data/cake.csv", stringsAsFactors = FALSE)
cake$recipe <- factor(cake$recipe, levels = c("A", "B", "C"))
cake$temperature <- factor(as.character(cake$temperature), levels = as.character(seq(175, 225, 10)))
cake$replicate <- factor(cake$replicate)

tab <- function(s) {                                  # summary -> list of columns
  s <- as.data.frame(s)
  for (v in names(s)) if (is.factor(s[[v]])) s[[v]] <- as.character(s[[v]])
  s
}

## one query: EMMs and a list of contrasts, for every ddf method
query <- function(fit, specs, by = NULL, at = NULL, contrasts = list(), ddfs, level = 0.95) {
  res <- list(specs = specs, by = by, at = at, level = level, results = list())
  for (ddf in ddfs) {
    emm <- if (is.null(at)) emmeans(fit, specs, by = by, lmer.df = ddf)
           else emmeans(fit, specs, by = by, at = at, lmer.df = ddf)
    r <- list(emm = tab(summary(emm, level = level, infer = c(TRUE, TRUE))), contrasts = list())
    for (cn in contrasts) {
      args <- list(emm, method = cn$method)
      if (!is.null(cn$adjust)) args$adjust <- cn$adjust
      if (!is.null(cn$ref)) args$ref <- cn$ref
      if (!is.null(cn$reverse)) args$reverse <- cn$reverse
      ct <- if (identical(cn$method, "pairs")) { args$method <- NULL; do.call(pairs, args) } else do.call(contrast, args)
      s <- summary(ct, level = level, infer = c(TRUE, TRUE))
      r$contrasts[[length(r$contrasts) + 1]] <- c(cn, list(table = tab(s), adjust_used = attr(s, "mesg")))
    }
    res$results[[ddf]] <- r
  }
  res
}
named <- function(...) lapply(list(...), function(x) x)

cases <- list()

## 1. random slopes: Orthodont
fit <- lmer(distance ~ age * Sex + (age | Subject), data = orth, REML = TRUE, control = ctrl)
cases$orthodont <- list(
  data = "lmmjax:orthodont", formula = "distance ~ age * Sex + (age | Subject)", REML = TRUE,
  queries = list(
    query(fit, "Sex", contrasts = list(list(method = "pairs")),
          ddfs = c("satterthwaite", "kenward-roger", "asymptotic")),
    query(fit, "Sex", by = "age", at = list(age = c(8, 14)),
          contrasts = list(list(method = "pairs"), list(method = "revpairwise")),
          ddfs = c("satterthwaite", "kenward-roger")),
    query(fit, c("Sex", "age"), at = list(age = c(8, 14)), level = 0.9,
          contrasts = list(list(method = "pairwise"), list(method = "pairwise", adjust = "holm"),
                           list(method = "consec", adjust = "sidak")),
          ddfs = c("satterthwaite", "kenward-roger"))
  ))

## 2. factorial split plot: Oats
fit <- lmer(yield ~ Variety * factor(nitro) + (1 | Block/Variety), data = oats, REML = TRUE, control = ctrl)
custom <- list(linear = c(-3, -1, 1, 3), "high - low" = c(-0.5, -0.5, 0.5, 0.5))
cases$oats <- list(
  data = "oats.csv", formula = "yield ~ Variety * factor(nitro) + (1 | Block/Variety)", REML = TRUE,
  queries = list(
    query(fit, "nitro",
          contrasts = list(list(method = "pairwise"), list(method = "trt.vs.ctrl"),
                           list(method = "trt.vs.ctrl", ref = 2), list(method = "pairwise", adjust = "holm"),
                           list(method = "pairwise", adjust = "BH"), list(method = "pairwise", adjust = "bonferroni"),
                           list(method = "pairwise", adjust = "sidak"), list(method = "pairwise", adjust = "none"),
                           list(method = "eff"), list(method = "consec", adjust = "holm"),
                           list(method = custom), list(method = custom, adjust = "holm"),
                           list(method = "revpairwise"), list(method = "pairs", reverse = TRUE)),
          ddfs = c("satterthwaite", "kenward-roger")),
    query(fit, "Variety", by = "nitro",
          contrasts = list(list(method = "pairwise"), list(method = "trt.vs.ctrl"), list(method = "eff"),
                           list(method = "pairwise", adjust = "fdr")),
          ddfs = c("satterthwaite", "kenward-roger")),
    query(fit, c("Variety", "nitro"),
          contrasts = list(list(method = "pairwise"), list(method = "trt.vs.ctrl", adjust = "holm")),
          ddfs = c("satterthwaite", "kenward-roger"))
  ))

## 3. two crossed factors, random intercept on an interaction: cake
fit <- lmer(angle ~ recipe * temperature + (1 | recipe:replicate), data = cake, REML = TRUE, control = ctrl)
cases$cake <- list(
  data = "extra:cake.csv", formula = "angle ~ recipe * temperature + (1 | recipe:replicate)", REML = TRUE,
  queries = list(
    query(fit, "recipe", contrasts = list(list(method = "pairwise"), list(method = "eff")),
          ddfs = c("satterthwaite", "kenward-roger", "asymptotic")),
    query(fit, "temperature", by = "recipe",
          contrasts = list(list(method = "trt.vs.ctrl"), list(method = "consec", adjust = "bonferroni"),
                           list(method = "pairwise")),
          ddfs = c("satterthwaite", "kenward-roger"))
  ))

## 4. a rank-deficient fit: Oats without the (Victory, nitro 0.6) plots — that cell's EMM and
##    every mean averaging over it are not estimable (NA), the others are
oats_m <- oats[!(oats$Variety == "Victory" & oats$nitro == 0.6), ]
fit <- lmer(yield ~ Variety * factor(nitro) + (1 | Block/Variety), data = oats_m, REML = TRUE, control = ctrl)
cases$oats_missing_cell <- list(
  data = "oats.csv", drop = list(Variety = "Victory", nitro = 0.6),
  formula = "yield ~ Variety * factor(nitro) + (1 | Block/Variety)", REML = TRUE,
  queries = list(
    query(fit, c("Variety", "nitro"), ddfs = c("satterthwaite", "kenward-roger")),
    query(fit, "nitro", contrasts = list(list(method = "pairwise", adjust = "holm")), ddfs = "satterthwaite")
  ))

## R's p.adjust on a fixed vector (hochberg and BY are not among the emmeans calls above)
pv <- c(0.01, 0.04, 0.03, 0.005, 0.2, 0.04, 0.5)
padj <- list(p = pv)
for (meth in c("holm", "hochberg", "BH", "BY", "bonferroni")) padj[[meth]] <- p.adjust(pv, meth)

info <- list(R = R.version.string, emmeans = as.character(packageVersion("emmeans")),
             lme4 = as.character(packageVersion("lme4")), lmerTest = as.character(packageVersion("lmerTest")),
             pbkrtest = as.character(packageVersion("pbkrtest")), control = "bobyqa rhoend=1e-12")
write_json(list(info = info, cases = cases, p_adjust = padj), file.path(outdir, "emmeans.json"),
           digits = NA, pretty = TRUE, auto_unbox = TRUE, null = "null", na = "null")
cat("wrote", file.path(outdir, "emmeans.json"), "\n")
