#!/usr/bin/env Rscript
## make_extra_cases.R -- extra lme4 reference cases for lmmjax (models that the
## shared reference in shared/reference/ does not cover).
##
## Writes, under tests/fixtures/extra/ (relative to the repo root):
##   data/<name>.csv   the datasets (write.csv, row.names = FALSE)
##   cases/<case>.json one fitted model per file, with the same fields as the
##                     lme4 cases of shared/reference (see its README.md)
## Every model is fitted to the CSV *as read back from disk*, factor level
## order restored.  Simulated data use a fixed set.seed per dataset.
##
## The helper functions are copied from shared/reference/make_reference.R
## (same JSON layout); the only change is that ranef records are written for
## all levels unless a grouping factor has more than 100 levels (then the
## first 30 of every factor).
##
## Usage (from the repo root):  Rscript tests/r/make_extra_cases.R [--out=DIR]
##   --out   folder that receives cases/ and data/
##           (default: tests/fixtures/extra next to this script's folder)
##
## Needs (Debian): r-base-core r-cran-lme4 r-cran-lmertest r-cran-pbkrtest
##                 r-cran-nlme r-cran-jsonlite

suppressPackageStartupMessages({
  library(lme4)
  library(lmerTest)
  library(pbkrtest)
  library(jsonlite)
})
options(contrasts = c("contr.treatment", "contr.poly"), warn = 1)

## ------------------------------------------------------------------ options
script_dir <- local({
  a <- grep("^--file=", commandArgs(FALSE), value = TRUE)
  if (length(a)) dirname(normalizePath(sub("^--file=", "", a[1]))) else getwd()
})
cli <- commandArgs(trailingOnly = TRUE)
get_opt <- function(name, default = NULL) {
  hit <- grep(paste0("^--", name, "(=|$)"), cli, value = TRUE)
  if (!length(hit)) return(default)
  if (!grepl("=", hit[1])) return(TRUE)
  sub(paste0("^--", name, "="), "", hit[1])
}
OUT <- normalizePath(get_opt("out", file.path(script_dir, "..", "fixtures", "extra")),
                     mustWork = FALSE)
OUT_DIRS <- OUT
for (d in OUT_DIRS)
  for (sub in c("cases", "data"))
    dir.create(file.path(d, sub), recursive = TRUE, showWarnings = FALSE)
OUT <- normalizePath(OUT)

pkg_versions <- function(pkgs) {
  c(list(R = R.version.string),
    setNames(lapply(pkgs, function(p) as.character(utils::packageVersion(p))), pkgs))
}
GENERATOR <- list(script = "tests/r/make_extra_cases.R",
                  versions = pkg_versions(c("lme4", "lmerTest", "pbkrtest", "nlme",
                                            "Matrix", "jsonlite")))

## ------------------------------------------------------------------ helpers
## JSON: always an array, even for length 0 or 1 (auto_unbox is on globally)
arr <- function(x) {
  if (is.null(x)) x <- character(0)
  I(unname(as.vector(x)))
}
named_vec <- function(x) list(names = arr(names(x)), values = arr(x))
mat_json <- function(m) {
  if (is.null(m)) return(NA)
  m <- as.matrix(m)
  list(rownames = arr(rownames(m)), colnames = arr(colnames(m)),
       values = unname(matrix(as.numeric(m), nrow(m), ncol(m))))
}
first_n <- function(x, n = 20) arr(head(unname(as.numeric(x)), n))
fstr <- function(f) paste(trimws(deparse(f, width.cutoff = 500L)), collapse = " ")
or_na <- function(x) if (is.null(x) || length(x) == 0) NA else x

write_case <- function(obj, out_dir, id) {
  path <- file.path(out_dir, "cases", paste0(id, ".json"))
  jsonlite::write_json(obj, path, digits = NA, auto_unbox = TRUE, na = "null",
                       pretty = TRUE)
  cat(sprintf("  -> cases/%s.json\n", id))
  invisible(path)
}

## Collect warnings / messages / errors per case instead of dying.
LOG <- new.env()
log_reset <- function() {
  LOG$warnings <- character(0); LOG$messages <- character(0); LOG$errors <- character(0)
}
capture <- function(expr, what) {
  withCallingHandlers(
    tryCatch(expr, error = function(e) {
      LOG$errors <- c(LOG$errors, paste0(what, ": ", conditionMessage(e)))
      NULL
    }),
    warning = function(w) {
      LOG$warnings <- c(LOG$warnings, paste0(what, ": ", conditionMessage(w)))
      invokeRestart("muffleWarning")
    },
    message = function(m) {
      LOG$messages <- c(LOG$messages, paste0(what, ": ", trimws(conditionMessage(m))))
      invokeRestart("muffleMessage")
    })
}
log_json <- function() {
  list(warnings = arr(unique(LOG$warnings)), messages = arr(unique(LOG$messages)),
       errors = arr(LOG$errors))
}
elapsed <- function(t0) as.numeric(difftime(Sys.time(), t0, units = "secs"))

## ------------------------------------------------------------------ data
## Plain data.frame: drop groupedData classes/attributes, make every factor
## (ordered or not) an unordered factor with the same level order.
plain_df <- function(df) {
  out <- lapply(as.list(as.data.frame(df)), function(x) {
    if (is.factor(x)) factor(as.character(x), levels = levels(x)) else as.vector(x)
  })
  data.frame(out, check.names = FALSE, stringsAsFactors = FALSE)
}

## Write data/<name>.csv, read it back, restore factors; return the read-back
## data (this is what every model is fitted to).
export_data <- function(df, name, out_dir, source) {
  file <- paste0(name, ".csv")
  path <- file.path(out_dir, "data", file)
  fac <- names(df)[vapply(df, is.factor, logical(1))]
  levs <- lapply(setNames(fac, fac), function(f) levels(df[[f]]))
  utils::write.csv(df, path, row.names = FALSE)
  back <- utils::read.csv(path, stringsAsFactors = FALSE, check.names = FALSE)
  stopifnot(identical(names(back), names(df)), nrow(back) == nrow(df))
  for (f in fac) {
    back[[f]] <- factor(as.character(back[[f]]), levels = levs[[f]])
    stopifnot(!anyNA(back[[f]]),
              identical(as.character(back[[f]]), as.character(df[[f]])))
  }
  for (v in setdiff(names(df), fac)) if (is.numeric(df[[v]]))
    stopifnot(isTRUE(all.equal(as.numeric(back[[v]]), as.numeric(df[[v]]),
                               tolerance = 1e-13)))
  cat(sprintf("  data/%s: %d rows x %d cols\n", file, nrow(back), ncol(back)))
  list(data = back, file = file, source = source, levels = levs)
}
levels_json <- function(ds) {
  if (!length(ds$levels)) return(structure(list(), names = character(0)))
  lapply(ds$levels, arr)
}

## ------------------------------------------------------------------ lme4 cases
coef_table <- function(tab) {
  if (is.null(tab)) return(NA)
  list(estimate = arr(tab[, "Estimate"]), se = arr(tab[, "Std. Error"]),
       df = arr(tab[, "df"]), t = arr(tab[, "t value"]), p = arr(tab[, "Pr(>|t|)"]))
}
anova_records <- function(a) {
  if (is.null(a)) return(NA)
  if (NROW(a) == 0) return(I(list()))
  data.frame(term = rownames(a), SumSq = a[["Sum Sq"]], MeanSq = a[["Mean Sq"]],
             NumDF = a[["NumDF"]], DenDF = a[["DenDF"]], F = a[["F value"]],
             p = a[["Pr(>F)"]], stringsAsFactors = FALSE)
}
varcorr_records <- function(fit) {
  vc <- as.data.frame(lme4::VarCorr(fit))
  data.frame(group = vc$grp, term1 = vc$var1, term2 = vc$var2,
             vcov = vc$vcov, sdcor = vc$sdcor, stringsAsFactors = FALSE)
}
ci_records <- function(ci) {
  if (is.null(ci)) return(NA)
  data.frame(parm = rownames(ci), lower = unname(ci[, 1]), upper = unname(ci[, 2]),
             stringsAsFactors = FALSE)
}

## Conditional modes and conditional SDs; for vector-valued terms also the
## conditional covariance block of every level.  max_levels: keep only the
## first levels (in factor-level order) of every grouping factor.
ranef_json <- function(fit, max_levels = Inf) {
  rr <- lme4::ranef(fit, condVar = TRUE)
  rdf <- as.data.frame(rr)
  keep <- logical(nrow(rdf))
  for (g in names(rr)) {
    sel <- rdf$grpvar == g
    keep[sel] <- match(as.character(rdf$grp[sel]), rownames(rr[[g]])) <= max_levels
  }
  rdf <- rdf[keep, ]
  records <- data.frame(group = as.character(rdf$grpvar), term = as.character(rdf$term),
                        level = as.character(rdf$grp), condval = rdf$condval,
                        condsd = rdf$condsd, stringsAsFactors = FALSE)
  condcov <- structure(list(), names = character(0))
  for (g in names(rr)) {
    pv <- attr(rr[[g]], "postVar")
    if (is.array(pv) && !is.list(pv) && dim(pv)[1] > 1) {
      lv <- rownames(rr[[g]])
      idx <- seq_len(min(length(lv), max_levels))
      condcov[[g]] <- list(terms = arr(colnames(rr[[g]])), levels = arr(lv[idx]),
                           cov = lapply(idx, function(j) unname(pv[, , j])))
    }
  }
  list(records = records, condcov = condcov,
       nlevels = lapply(rr, nrow))
}

lmer_case <- function(id, formula, ds, out_dir, REML = TRUE, notes = character(0),
                      kr = TRUE, ranef_levels = NULL, profile_ci = FALSE,
                      extra = list()) {
  cat(sprintf("[lmer] %s\n", id))
  log_reset()
  dat <- ds$data
  fit <- capture(lmerTest::lmer(formula, data = dat, REML = REML), "lmer")
  res <- list(case = id, engine = "lme4::lmer via lmerTest::lmer",
              dataset = ds$file, dataset_source = ds$source,
              formula = fstr(formula), REML = REML,
              contrasts = "contr.treatment for every (unordered) factor",
              factor_levels = levels_json(ds), notes = arr(notes))
  if (is.null(fit)) {
    res$log <- log_json(); res$generator <- GENERATOR
    write_case(res, out_dir, id)
    return(invisible(NULL))
  }
  ## all levels, unless some grouping factor has more than 100: then the first 30
  if (is.null(ranef_levels))
    ranef_levels <- if (any(lme4::ngrps(fit) > 100)) 30 else Inf
  beta <- lme4::fixef(fit)
  p <- length(beta)
  V0 <- as.matrix(vcov(fit))
  s_sat <- capture(summary(fit, ddf = "Satterthwaite")$coefficients, "summary(Satterthwaite)")
  a_sat <- capture(anova(fit, type = 3, ddf = "Satterthwaite"), "anova(type 3, Satterthwaite)")

  kr_block <- NA
  a_kr <- NULL
  if (kr && REML) {
    ## vcovAdj's result carries attributes P and W that Lb_ddf needs
    Vadj_raw <- capture(pbkrtest::vcovAdj(fit), "pbkrtest::vcovAdj")
    Vadj <- if (is.null(Vadj_raw)) NULL else as.matrix(Vadj_raw)
    df_lb <- if (!is.null(Vadj)) capture(vapply(seq_len(p), function(i) {
      L <- matrix(0, 1, p); L[1, i] <- 1
      as.numeric(pbkrtest::Lb_ddf(L, V0, Vadj_raw))
    }, numeric(1)), "pbkrtest::Lb_ddf")
    s_kr <- capture(summary(fit, ddf = "Kenward-Roger")$coefficients, "summary(Kenward-Roger)")
    a_kr <- capture(anova(fit, type = 3, ddf = "Kenward-Roger"), "anova(type 3, Kenward-Roger)")
    kr_tab <- coef_table(s_kr)
    if (!is.list(kr_tab)) kr_tab <- list(estimate = NA, se = NA, df = NA, t = NA, p = NA)
    kr_block <- c(kr_tab,
                  list(vcov_adj = if (is.null(Vadj)) NA else unname(Vadj),
                       se_from_vcov_adj = if (is.null(Vadj)) NA else arr(sqrt(diag(Vadj))),
                       df_pbkrtest_Lb_ddf = if (is.null(df_lb)) NA else arr(df_lb)))
  } else if (kr && !REML) {
    notes <- c(notes, "Kenward-Roger not computed: it is defined for REML fits only (lmerTest refuses ML fits; pbkrtest would refit with REML).")
    res$notes <- arr(notes)
  }

  ll <- logLik(fit)
  th <- lme4::getME(fit, "theta")
  re <- capture(ranef_json(fit, ranef_levels), "ranef(condVar = TRUE)")
  res <- c(res, list(
    nobs = nobs(fit),
    ngrps = as.list(lme4::ngrps(fit)),
    fixed = list(names = arr(names(beta)), estimate = arr(beta),
                 se = arr(sqrt(diag(V0))), vcov = unname(V0),
                 satterthwaite = coef_table(s_sat),
                 kenward_roger = kr_block),
    anova_type3 = list(satterthwaite = anova_records(a_sat),
                       kenward_roger = anova_records(a_kr)),
    theta = arr(th), theta_names = arr(names(th)),
    theta_lower = arr(lme4::getME(fit, "lower")),
    sigma = sigma(fit),
    varcorr = varcorr_records(fit),
    logLik = as.numeric(ll), logLik_df = attr(ll, "df"),
    REMLcrit = if (REML) lme4::REMLcrit(fit) else NA,
    deviance = if (!REML) deviance(fit) else NA,
    AIC = AIC(fit), BIC = BIC(fit),
    isSingular = lme4::isSingular(fit),
    optimizer = or_na(fit@optinfo$optimizer),
    convergence = list(code = or_na(fit@optinfo$conv$opt),
                       messages = arr(fit@optinfo$conv$lme4$messages)),
    ranef = if (is.null(re)) NA else re$records,
    ranef_levels_written = if (is.finite(ranef_levels)) ranef_levels else "all",
    ranef_condcov = if (is.null(re)) NA else re$condcov,
    fitted_first20 = first_n(fitted(fit)),
    residuals_first20 = first_n(residuals(fit)),
    predict_fixed_first20 = first_n(predict(fit, re.form = NA))
  ))
  if (profile_ci) {
    ci_p <- capture(confint(fit, method = "profile", oldNames = FALSE), "confint(profile)")
    ci_w <- capture(confint(fit, method = "Wald", oldNames = FALSE), "confint(Wald)")
    res$confint <- list(level = 0.95, profile = ci_records(ci_p), wald = ci_records(ci_w))
  }
  res <- c(res, extra)
  res$log <- log_json()
  res$generator <- GENERATOR
  write_case(res, out_dir, id)
  invisible(fit)
}


## ================================================================== cases
T0 <- Sys.time()
cat("== extra cases ->", OUT, "\n")
S <- OUT
sim_src <- function(seed) sprintf("simulated in tests/r/make_extra_cases.R (set.seed(%d))", seed)
py_note <- function(f) paste0("Python formula: ", f)

## numeric-sorted factor (lme4 would order integer codes the same way)
int_factor <- function(x) factor(as.character(x), levels = as.character(sort(unique(x))))

## ---- a. factor interactions, unbalanced -----------------------------------
set.seed(101)
local({
  ng <- 15
  sizes <- sample(8:30, ng, replace = TRUE)
  g <- rep(seq_len(ng), sizes)
  n <- length(g)
  A <- sample(c("a1", "a2", "a3"), n, replace = TRUE, prob = c(0.4, 0.35, 0.25))
  B <- sample(c("b1", "b2"), n, replace = TRUE, prob = c(0.6, 0.4))
  x <- round(rnorm(n, 5, 2), 3)
  u <- rnorm(ng, 0, 1.5)
  effA <- c(a1 = 0, a2 = 1.2, a3 = -0.8)
  effAB <- c(a1 = 0, a2 = 0.9, a3 = -1.1)
  y <- 20 + effA[A] + 0.7 * (B == "b2") + effAB[A] * (B == "b2") + 0.4 * x +
    u[g] + rnorm(n, 0, 1.2)
  df <- data.frame(y = round(unname(y), 4),
                   A = factor(A, levels = c("a1", "a2", "a3")),
                   B = factor(B, levels = c("b1", "b2")),
                   x = x,
                   g = factor(sprintf("G%02d", g), levels = sprintf("G%02d", seq_len(ng))))
  df <- df[sort(sample(n, round(0.85 * n))), ]   # drop 15% of rows at random
  rownames(df) <- NULL
  ds <- export_data(df, "sim_factor_interactions", S, sim_src(101))
  lmer_case("sim_factor_interactions_reml", y ~ A * B + x + (1 | g), ds, S,
            notes = c(py_note("y ~ A * B + x + (1 | g)"),
                      "Unbalanced: unequal group sizes and 15% of rows dropped at random."))
})

## ---- b. quadratic fixed term, correlated random slope ----------------------
set.seed(202)
local({
  ng <- 25
  sizes <- sample(6:14, ng, replace = TRUE)
  g <- rep(seq_len(ng), sizes)
  n <- length(g)
  x <- round(runif(n, -2, 2), 3)
  L <- t(chol(matrix(c(4, 0.6, 0.6, 0.5), 2)))
  u <- t(L %*% matrix(rnorm(2 * ng), 2))
  y <- 5 + 1.5 * x - 0.6 * x^2 + u[g, 1] + u[g, 2] * x + rnorm(n, 0, 1)
  df <- data.frame(y = round(y, 4), x = x,
                   g = factor(sprintf("g%02d", g), levels = sprintf("g%02d", seq_len(ng))))
  ds <- export_data(df, "sim_quadratic", S, sim_src(202))
  lmer_case("sim_quadratic_reml", y ~ x + I(x^2) + (1 + x | g), ds, S,
            notes = c(py_note("y ~ x + I(x**2) + (1 + x | g)"),
                      "R's I(x^2) is I(x**2) in the Python (formulaic/patsy) formula; the fixed-effect name is R's 'I(x^2)'."))
})

## ---- c. three crossed factors ----------------------------------------------
set.seed(303)
local({
  n <- 640
  na <- 12; nb <- 8; nc <- 5
  a <- sample(na, n, replace = TRUE, prob = runif(na, 0.5, 1.5))
  b <- sample(nb, n, replace = TRUE, prob = runif(nb, 0.5, 1.5))
  c_ <- sample(nc, n, replace = TRUE, prob = runif(nc, 0.5, 1.5))
  x <- round(rnorm(n), 3)
  ua <- rnorm(na, 0, 1.0); ub <- rnorm(nb, 0, 0.7); uc <- rnorm(nc, 0, 1.2)
  y <- 3 + 0.8 * x + ua[a] + ub[b] + uc[c_] + rnorm(n, 0, 1)
  df <- data.frame(y = round(y, 4), x = x,
                   a = factor(paste0("a", a), levels = paste0("a", seq_len(na))),
                   b = factor(paste0("b", b), levels = paste0("b", seq_len(nb))),
                   c = factor(paste0("c", c_), levels = paste0("c", seq_len(nc))))
  df <- df[sort(sample(n, 600)), ]
  rownames(df) <- NULL
  ds <- export_data(df, "sim_three_crossed", S, sim_src(303))
  lmer_case("sim_three_crossed_reml", y ~ x + (1 | a) + (1 | b) + (1 | c), ds, S,
            notes = c(py_note("y ~ x + (1 | a) + (1 | b) + (1 | c)"),
                      "Three crossed factors (12, 8, 5 levels), unbalanced (levels drawn with unequal probabilities)."))
})

## ---- d. random slopes on a 3-level factor (3x3 unstructured) ---------------
set.seed(404)
local({
  ng <- 30
  levs <- c("ctrl", "low", "high")
  rows <- lapply(seq_len(ng), function(j) {
    k <- sample(3:7, 3, replace = TRUE)
    data.frame(g = j, cond = rep(levs, k))
  })
  df <- do.call(rbind, rows)
  n <- nrow(df)
  Sig <- matrix(c(4.0, -1.0, 0.8,
                  -1.0, 2.0, 0.6,
                  0.8, 0.6, 3.0), 3)
  u <- t(t(chol(Sig)) %*% matrix(rnorm(3 * ng), 3))
  ci <- match(df$cond, levs)
  X <- cbind(1, ci == 2, ci == 3)
  y <- 10 + 1.5 * (ci == 2) + 3 * (ci == 3) + rowSums(X * u[df$g, ]) + rnorm(n, 0, 1)
  df <- data.frame(y = round(y, 4),
                   cond = factor(df$cond, levels = levs),
                   g = factor(sprintf("s%02d", df$g), levels = sprintf("s%02d", seq_len(ng))))
  ds <- export_data(df, "sim_slope_on_factor", S, sim_src(404))
  lmer_case("sim_slope_on_factor_reml", y ~ cond + (1 + cond | g), ds, S,
            notes = c(py_note("y ~ cond + (1 + cond | g)"),
                      "Random slopes on a 3-level factor: a 3x3 unstructured covariance per group (terms (Intercept), condlow, condhigh; reference level ctrl)."))
})

## ---- e. uncorrelated intercept + slope, log transform, ML ------------------
set.seed(505)
local({
  ng <- 40
  sizes <- sample(5:12, ng, replace = TRUE)
  g <- rep(seq_len(ng), sizes)
  n <- length(g)
  z <- round(exp(runif(n, log(0.5), log(50))), 4)
  x <- round(rnorm(n, 0, 1.5), 3)
  u0 <- rnorm(ng, 0, 1.5); u1 <- rnorm(ng, 0, 0.6)
  y <- 2 + 0.9 * log(z) - 0.5 * x + u0[g] + u1[g] * x + rnorm(n, 0, 0.8)
  df <- data.frame(y = round(y, 4), z = z, x = x,
                   g = factor(sprintf("g%02d", g), levels = sprintf("g%02d", seq_len(ng))))
  ds <- export_data(df, "sim_log_uncorrelated", S, sim_src(505))
  lmer_case("sim_slope_on_factor_uncorrelated_ml", y ~ log(z) + x + (x || g), ds, S,
            REML = FALSE,
            notes = c(py_note("y ~ np.log(z) + x + (x || g)"),
                      "R's log(z) is np.log(z) in the Python formula; the fixed-effect name is R's 'log(z)'.",
                      "(x || g) is expanded by lme4 to (1 | g) + (0 + x | g): two independent terms, theta_names 'g.(Intercept)' and 'g.x'.",
                      "Despite the case name the slope is on a numeric x (name kept as requested)."))
})

## ---- f. nested three-level model, integer codes reused across schools ------
set.seed(606)
local({
  nsch <- 12
  rows <- list()
  for (s in seq_len(nsch)) {
    ncl <- sample(2:5, 1)
    for (k in seq_len(ncl)) {
      m <- sample(4:14, 1)
      rows[[length(rows) + 1]] <- data.frame(school = s, class = k, m = m)[rep(1, m), 1:2]
    }
  }
  df <- do.call(rbind, rows)
  n <- nrow(df)
  usch <- rnorm(nsch, 0, 2)
  key <- paste(df$school, df$class)
  ucl <- rnorm(length(unique(key)), 0, 1.2)
  names(ucl) <- unique(key)
  x <- round(rnorm(n), 3)
  y <- 50 + 2 * x + usch[df$school] + ucl[key] + rnorm(n, 0, 1.5)
  df <- data.frame(y = round(unname(y), 4), x = x,
                   school = int_factor(df$school), class = int_factor(df$class))
  ds <- export_data(df, "sim_nested_three_level", S, sim_src(606))
  lmer_case("sim_nested_three_level_reml", y ~ x + (1 | school / class), ds, S,
            notes = c(py_note("y ~ x + (1 | school/class)"),
                      "school and class are integer codes in the CSV (written quoted, as R factor labels); class codes 1..k are reused in every school, so class alone is NOT the grouping factor: (1 | school/class) = (1 | school) + (1 | class:school).",
                      "Factor levels are in numeric order (1, 2, ..., 10, 11, 12), the order lme4 uses for integer codes; lme4 labels the nested factor 'class:school', e.g. '2:11'."))
})

## ---- g. singular random slope ---------------------------------------------
set.seed(707)
local({
  ng <- 20
  g <- rep(seq_len(ng), each = 8)
  n <- length(g)
  x <- round(rep(seq(-1, 1, length.out = 8), ng) + rnorm(n, 0, 0.1), 3)
  u0 <- rnorm(ng, 0, 1)
  y <- 1 + 0.5 * x + u0[g] + 0 * x + rnorm(n, 0, 1)   # true slope variance 0
  df <- data.frame(y = round(y, 4), x = x,
                   g = factor(sprintf("g%02d", g), levels = sprintf("g%02d", seq_len(ng))))
  ds <- export_data(df, "sim_singular_slope", S, sim_src(707))
  lmer_case("sim_singular_slope_reml", y ~ x + (1 + x | g), ds, S,
            notes = c(py_note("y ~ x + (1 + x | g)"),
                      "Simulated with zero slope variance: the fit is singular (isSingular TRUE; the estimated covariance is on the boundary)."))
})

## ---- h. cake ---------------------------------------------------------------
local({
  ck <- lme4::cake
  ck$temperature <- factor(as.character(ck$temperature), levels = levels(ck$temperature))
  ds <- export_data(plain_df(ck), "cake", S, "lme4::cake")
  lmer_case("cake_reml", angle ~ recipe * temperature + (1 | recipe:replicate), ds, S,
            notes = c(py_note("angle ~ recipe * temperature + (1 | recipe:replicate)"),
                      "temperature is an ordered factor in lme4::cake (polynomial contrasts by default); it was converted to an unordered factor with factor(as.character(temperature), levels = levels(temperature)) so treatment contrasts apply (reference level '175').",
                      "The numeric column temp is in the CSV but unused."))
})

## ---- i. no intercept, full dummy coding -----------------------------------
set.seed(909)
local({
  ng <- 18
  sizes <- sample(5:15, ng, replace = TRUE)
  g <- rep(seq_len(ng), sizes)
  n <- length(g)
  grp <- sample(c("ctl", "trt"), n, replace = TRUE)
  x <- round(runif(n, 0, 10), 3)
  u <- rnorm(ng, 0, 2)
  y <- ifelse(grp == "trt", 8, 5) + 0.3 * x + u[g] + rnorm(n, 0, 1.5)
  df <- data.frame(y = round(y, 4), grp = factor(grp, levels = c("ctl", "trt")), x = x,
                   g = factor(sprintf("g%02d", g), levels = sprintf("g%02d", seq_len(ng))))
  ds <- export_data(df, "sim_no_intercept", S, sim_src(909))
  lmer_case("sim_no_intercept_reml", y ~ 0 + grp + x + (1 | g), ds, S,
            notes = c(py_note("y ~ 0 + grp + x + (1 | g)"),
                      "No intercept: grp gets full dummy coding (grpctl, grptrt)."))
})

## ---- j. sleepstudy, Days >= 2 shifted -------------------------------------
local({
  sl <- plain_df(lme4::sleepstudy)
  sl <- sl[sl$Days >= 2, ]
  sl$Days <- sl$Days - 2
  rownames(sl) <- NULL
  ds <- export_data(sl, "sleepstudy_days2", S,
                    "lme4::sleepstudy, rows with Days >= 2, Days := Days - 2")
  lmer_case("sleepstudy_days_factor_reml", Reaction ~ Days + (Days | Subject), ds, S,
            notes = c(py_note("Reaction ~ Days + (Days | Subject)"),
                      "sleepstudy restricted to Days >= 2 (days 0-1 were adaptation/training), with Days shifted to Days - 2 (numeric, 0..7).",
                      "Despite the case name Days is numeric (name kept as requested)."))
})

cat(sprintf("done in %.1f s\n", elapsed(T0)))
