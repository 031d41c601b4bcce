#!/usr/bin/env Rscript
## make_tight_cases.R -- lme4 reference cases refitted with a tight optimizer.
##
## lme4's default optimizer (nloptwrap) sometimes stops before the optimum;
## e.g. orthodont_lmer_age_sex_reml has REMLcrit 432.581667064601 by default
## but 432.581661502608 with bobyqa and rhoend = 1e-12, and the random-
## intercept SD moves by about 1e-3 relative.  This script refits every lme4
## case (every case JSON with a "formula" field) of
##   tests/fixtures/reference/cases/  and  tests/fixtures/extra/cases/
## with
##   lmerControl(optimizer = "bobyqa", optCtrl = list(rhoend = 1e-12, maxfun = 1e6))
## and writes tests/fixtures/tight/cases/<case>.json with the same fields as
## the original (plus "control", "default_criterion", "data_dir" and
## "dataset_path").  nlme cases and the comparison case (no "formula") are
## skipped.  The data are read from the original CSVs (not copied): the file
## is tests/fixtures/<data_dir>/data/<dataset>.
##
## The helper functions (JSON layout, logging, ranef, lmer_case) are taken from
## tests/r/make_extra_cases.R: only its top-level function definitions are
## evaluated, so its main part (simulating data, writing extra cases) is NOT run.
##
## Usage (from the repo root):  Rscript tests/r/make_tight_cases.R [--out=DIR]
##   --out   folder that receives cases/ (default: tests/fixtures/tight)

suppressPackageStartupMessages({
  library(lme4)
  library(lmerTest)
  library(pbkrtest)
  library(jsonlite)
})
options(contrasts = c("contr.treatment", "contr.poly"), warn = 1)

## ------------------------------------------------------------------ paths
script_dir <- local({
  a <- grep("^--file=", commandArgs(FALSE), value = TRUE)
  if (length(a)) dirname(normalizePath(sub("^--file=", "", a[1]))) else getwd()
})
FIXTURES <- normalizePath(file.path(script_dir, "..", "fixtures"))

## ------------------------------------------------------------------ helpers
## Evaluate only the top-level `name <- function(...)` definitions (and the
## LOG environment) of make_extra_cases.R.
local({
  src <- file.path(script_dir, "make_extra_cases.R")
  exprs <- parse(src, keep.source = FALSE)
  is_def <- function(e) {
    is.call(e) && identical(e[[1]], as.name("<-")) && is.name(e[[2]]) &&
      (identical(as.character(e[[2]]), "LOG") ||
         (is.call(e[[3]]) && identical(e[[3]][[1]], as.name("function"))))
  }
  n <- 0
  for (e in exprs) if (is_def(e)) { eval(e, envir = globalenv()); n <- n + 1 }
  needed <- c("arr", "write_case", "log_reset", "capture", "log_json", "levels_json",
              "lmer_case", "ranef_json", "coef_table", "anova_records",
              "varcorr_records", "get_opt", "pkg_versions", "elapsed")
  miss <- needed[!vapply(needed, exists, logical(1), envir = globalenv())]
  if (length(miss)) stop("helpers missing from make_extra_cases.R: ",
                         paste(miss, collapse = ", "))
  if (!is.environment(get("LOG", envir = globalenv())))
    stop("LOG environment not defined by make_extra_cases.R")
})

cli <- commandArgs(trailingOnly = TRUE)          # used by get_opt()
OUT <- normalizePath(get_opt("out", file.path(FIXTURES, "tight")), mustWork = FALSE)
dir.create(file.path(OUT, "cases"), recursive = TRUE, showWarnings = FALSE)
OUT <- normalizePath(OUT)

GENERATOR <- list(script = "tests/r/make_tight_cases.R",
                  versions = pkg_versions(c("lme4", "lmerTest", "pbkrtest", "nlme",
                                            "Matrix", "minqa", "jsonlite")))

## ------------------------------------------------------------------ control
TIGHT_CONTROL <- lmerControl(optimizer = "bobyqa",
                             optCtrl = list(rhoend = 1e-12, maxfun = 1e6))
CONTROL_JSON <- list(
  call = 'lmerControl(optimizer = "bobyqa", optCtrl = list(rhoend = 1e-12, maxfun = 1e6))',
  optimizer = "bobyqa", package = "minqa",
  optCtrl = list(rhoend = 1e-12, maxfun = 1e6),
  note = "All other lmerControl settings are lme4's defaults. The original cases used lme4's default optimizer (nloptwrap)."
)

## lmer_case() from make_extra_cases.R, with the fit call given the tight
## control.  The replacement is checked: exactly one call must change.
lmer_case_tight <- local({
  f <- lmer_case
  old <- quote(lmerTest::lmer(formula, data = dat, REML = REML))
  new <- quote(lmerTest::lmer(formula, data = dat, REML = REML, control = TIGHT_CONTROL))
  hits <- 0
  patch <- function(e) {
    if (identical(e, old)) { hits <<- hits + 1; return(new) }
    if (is.call(e)) for (i in seq_along(e)) if (!is.null(e[[i]])) e[[i]] <- patch(e[[i]])
    e
  }
  body(f) <- patch(body(f))
  if (hits != 1) stop("could not patch the lmer call in lmer_case (", hits, " matches)")
  f
})

## ------------------------------------------------------------------ data
## Read the case's CSV; factor columns as strings, then factor() with the level
## order stored in the case's factor_levels.
read_case_data <- function(path, levels) {
  fac <- names(levels)
  cc <- if (length(fac)) setNames(rep("character", length(fac)), fac) else NA
  dat <- utils::read.csv(path, stringsAsFactors = FALSE, check.names = FALSE,
                         colClasses = cc)
  for (f in fac) {
    if (!f %in% names(dat)) stop(path, ": factor column ", f, " not in the CSV")
    dat[[f]] <- factor(dat[[f]], levels = levels[[f]])
    if (anyNA(dat[[f]])) stop(path, ": labels of ", f, " outside factor_levels")
  }
  dat
}

## ------------------------------------------------------------------ cases
crit_of <- function(x) if (isTRUE(x$REML)) x$REMLcrit else x$deviance
KR_ML_NOTE <- "Kenward-Roger not computed"

T0 <- Sys.time()
cat("== tight cases ->", OUT, "\n")
rows <- list()
for (data_dir in c("reference", "extra")) {
  case_files <- sort(Sys.glob(file.path(FIXTURES, data_dir, "cases", "*.json")))
  for (cf in case_files) {
    orig <- jsonlite::read_json(cf, simplifyVector = TRUE)
    if (is.null(orig$formula)) {
      cat(sprintf("[skip] %s (no formula)\n", basename(cf)))
      next
    }
    id <- orig$case
    levs <- if (length(orig$factor_levels)) lapply(orig$factor_levels, as.character) else list()
    data_path <- file.path(FIXTURES, data_dir, "data", orig$dataset)
    ds <- list(data = read_case_data(data_path, levs), file = orig$dataset,
               source = orig$dataset_source, levels = levs)
    stopifnot(nrow(ds$data) == orig$nobs)
    formula <- stats::as.formula(orig$formula, env = globalenv())
    if (fstr(formula) != orig$formula)
      stop(id, ": formula does not round-trip: ", fstr(formula), " vs ", orig$formula)
    ranef_levels <- if (is.numeric(orig$ranef_levels_written)) orig$ranef_levels_written else Inf
    ## lmer_case appends the Kenward-Roger note itself for ML fits
    notes <- as.character(unlist(orig$notes))
    notes <- notes[!startsWith(notes, KR_ML_NOTE)]
    notes <- c(notes, sprintf(
      "Refit of tests/fixtures/%s/cases/%s.json with the tight control in 'control'; data: tests/fixtures/%s/data/%s.",
      data_dir, id, data_dir, orig$dataset))
    default_crit <- crit_of(orig)
    fit <- lmer_case_tight(
      id, formula, ds, OUT, REML = isTRUE(orig$REML), notes = notes,
      ranef_levels = ranef_levels,
      extra = list(control = CONTROL_JSON,
                   default_criterion = default_crit,
                   data_dir = data_dir,
                   dataset_path = file.path("..", "..", data_dir, "data", orig$dataset)))
    if (is.null(fit)) stop(id, ": tight refit failed (see its log)")
    tight_crit <- if (isTRUE(orig$REML)) lme4::REMLcrit(fit) else deviance(fit)
    th0 <- as.numeric(orig$theta)
    th1 <- as.numeric(lme4::getME(fit, "theta"))
    rows[[id]] <- data.frame(
      case = id, crit = if (isTRUE(orig$REML)) "REMLcrit" else "deviance",
      default = default_crit, tight = tight_crit, diff = tight_crit - default_crit,
      max_dtheta = max(abs(th1 - th0)), conv = fit@optinfo$conv$opt,
      stringsAsFactors = FALSE)
  }
}

tab <- do.call(rbind, rows)
rownames(tab) <- NULL
cat("\n== criterion: default (nloptwrap) vs tight (bobyqa, rhoend 1e-12)\n")
cat(sprintf("%-38s %-8s %20s %20s %11s %10s %4s\n", "case", "crit", "default", "tight",
            "diff", "max|dth|", "conv"))
for (i in seq_len(nrow(tab)))
  cat(sprintf("%-38s %-8s %20.12f %20.12f %11.3e %10.2e %4d\n", tab$case[i], tab$crit[i],
              tab$default[i], tab$tight[i], tab$diff[i], tab$max_dtheta[i], tab$conv[i]))
cat(sprintf("%d cases in %.1f s\n", nrow(tab), elapsed(T0)))
