#!/usr/bin/env Rscript
## make_batch_reference.R -- R reference fixture for batch fitting (lmer_batch).
##
## Simulates a single-cell-like design (8 donors x 2 conditions, crossed:
## every donor has cells in both conditions, unbalanced cell counts) and a
## cells x 60 genes response matrix with missing values in 12 genes, then fits
## every gene separately with lmerTest::lmer (REML, na.action = na.omit) for
##   intercept:  y ~ condition + (1 | donor)
##   slope:      y ~ condition + (1 + condition | donor)
## and writes, into tests/fixtures/batch/:
##   obs.csv         cell, donor, condition
##   Y.csv           cell, gene001..gene060 (NA = missing), exact values
##   reference.json  per model and gene: fit, variance components,
##                   Satterthwaite and Kenward-Roger results, messages
## Each gene is fitted with a tight optimizer (bobyqa, rhoend = 1e-12) and
## with lme4's default lmerControl(), plus tight refits from the default fit's
## theta and from a few fixed starting thetas (the slope model has local
## optima and bobyqa sometimes stalls near the boundary).  The reference is
## the tight fit unless another candidate's REML criterion is lower by more
## than 1e-10; then it is the candidate with the lowest criterion.
##
## Usage (from the repo root):  Rscript tests/r/make_batch_reference.R
## Everything except meta.timing in reference.json is deterministic.

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
OUT <- file.path(normalizePath(file.path(script_dir, "..", "fixtures")), "batch")
dir.create(OUT, recursive = TRUE, showWarnings = FALSE)
T_START <- Sys.time()

## ------------------------------------------------------------------ JSON numbers
## jsonlite prints at most 15 significant digits (even with digits = NA or
## I(17)), which does not round-trip doubles.  Numbers are therefore
## formatted here with the shortest of %.15g/%.16g/%.17g that round-trips and
## inserted verbatim (class "json", write_json(json_verbatim = TRUE)).
fmt1 <- function(v) {
  if (is.na(v) || !is.finite(v)) return("null")
  for (d in 15:17) {
    s <- sprintf(paste0("%.", d, "g"), v)
    if (as.numeric(s) == v) break
  }
  s
}
num <- function(x) {                      # scalar (NULL / empty -> null)
  if (is.null(x) || length(x) == 0) return(structure("null", class = "json"))
  stopifnot(length(x) == 1)
  structure(fmt1(as.numeric(x)), class = "json")
}
numarr <- function(x)                     # always a JSON array
  structure(paste0("[", paste(vapply(as.numeric(x), fmt1, ""), collapse = ","), "]"),
            class = "json")
strarr <- function(x) I(as.character(x))  # always a JSON array of strings

## ------------------------------------------------------------------ simulate
SEED <- 20240607L
set.seed(SEED)
DONORS <- sprintf("D%d", 1:8)
CONDS <- c("ctl", "trt")
G <- 60L
GENES <- sprintf("gene%03d", seq_len(G))

## cell counts per donor x condition, each in 10..40, total 300..400
repeat {
  counts <- matrix(sample(10:40, 16, replace = TRUE), 8, 2,
                   dimnames = list(DONORS, CONDS))
  if (sum(counts) >= 300 && sum(counts) <= 400) break
}
obs <- do.call(rbind, lapply(DONORS, function(d) do.call(rbind, lapply(CONDS, function(k)
  data.frame(donor = rep(d, counts[d, k]), condition = rep(k, counts[d, k]),
             stringsAsFactors = FALSE)))))
obs <- obs[sample(nrow(obs)), ]                  # shuffle rows (cell order random)
rownames(obs) <- NULL
n <- nrow(obs)
obs <- data.frame(cell = sprintf("cell%04d", seq_len(n)), obs, stringsAsFactors = FALSE)

## per-gene truth
idx <- seq_len(G)
truth <- data.frame(
  gene = GENES,
  b0 = round(runif(G, -1, 3), 3),
  b1 = ifelse(idx %% 3 == 0, sample(c(-1, 1), G, TRUE) * round(runif(G, 0.3, 1.5), 3), 0),
  donor_sd = ifelse(idx <= 20, 0, round(runif(G, 0.2, 1.5), 3)),
  slope_sd = ifelse(idx %in% c(16:20, 41:60), round(runif(G, 0.3, 1.0), 3), 0),
  sigma = round(runif(G, 0.5, 1.5), 3),
  stringsAsFactors = FALSE)

di <- match(obs$donor, DONORS)
trt <- as.numeric(obs$condition == "trt")
Y <- matrix(NA_real_, n, G, dimnames = list(NULL, GENES))
for (g in idx) {
  u0 <- rnorm(8, 0, truth$donor_sd[g])           # sd 0 -> exactly 0
  u1 <- rnorm(8, 0, truth$slope_sd[g])
  Y[, g] <- truth$b0[g] + truth$b1[g] * trt + u0[di] + u1[di] * trt +
    rnorm(n, 0, truth$sigma[g])
}
Y <- round(Y, 6)     # short exact decimals in Y.csv (keeps the fixture small)

## missing values
NA_PATTERNS <- list(
  random_few      = c(2L, 24L, 47L),   # 3-6 random cells
  random_30pct    = c(7L, 22L, 52L),   # round(0.3 n) random cells
  donor_all       = c(9L, 26L, 55L),   # every cell of one donor
  donor_condition = c(13L, 30L, 58L)   # every cell of one donor x condition
)
NA_DC <- list(c("D2", "trt"), c("D6", "ctl"), c("D4", "trt"))
truth$na_pattern <- "none"
truth$na_detail <- ""
for (g in NA_PATTERNS$random_few) {
  k <- sample(3:6, 1); Y[sample(n, k), g] <- NA
  truth$na_pattern[g] <- "random_few"; truth$na_detail[g] <- sprintf("%d random cells", k)
}
for (g in NA_PATTERNS$random_30pct) {
  k <- round(0.3 * n); Y[sample(n, k), g] <- NA
  truth$na_pattern[g] <- "random_30pct"; truth$na_detail[g] <- sprintf("%d random cells", k)
}
for (j in seq_along(NA_PATTERNS$donor_all)) {
  g <- NA_PATTERNS$donor_all[j]; d <- c("D3", "D5", "D8")[j]
  Y[obs$donor == d, g] <- NA
  truth$na_pattern[g] <- "donor_all"; truth$na_detail[g] <- sprintf("donor %s", d)
}
for (j in seq_along(NA_PATTERNS$donor_condition)) {
  g <- NA_PATTERNS$donor_condition[j]; dc <- NA_DC[[j]]
  Y[obs$donor == dc[1] & obs$condition == dc[2], g] <- NA
  truth$na_pattern[g] <- "donor_condition"
  truth$na_detail[g] <- sprintf("donor %s x condition %s", dc[1], dc[2])
}
truth$n_missing <- colSums(is.na(Y))
## sanity: no gene loses a whole condition; every gene keeps >= 7 donors
for (g in idx) {
  ok <- !is.na(Y[, g])
  stopifnot(all(table(factor(obs$condition[ok], levels = CONDS)) >= 2),
            length(unique(obs$donor[ok])) >= 7)
}
stopifnot(sum(truth$n_missing > 0) == 12)

## ------------------------------------------------------------------ write CSVs
write.csv(obs, file.path(OUT, "obs.csv"), row.names = FALSE, quote = FALSE)
Ychr <- apply(Y, 2, function(col) vapply(col, fmt1, ""))
Ychr[Ychr == "null"] <- "NA"
write.csv(data.frame(cell = obs$cell, Ychr, stringsAsFactors = FALSE, check.names = FALSE),
          file.path(OUT, "Y.csv"), row.names = FALSE, quote = FALSE)

## read back: the fits use exactly what the CSVs hold
obs_in <- read.csv(file.path(OUT, "obs.csv"), colClasses = "character")
Y_in <- read.csv(file.path(OUT, "Y.csv"), colClasses = c("character", rep("numeric", G)),
                 check.names = FALSE)
stopifnot(identical(obs_in$cell, obs$cell), identical(Y_in$cell, obs$cell),
          identical(names(Y_in)[-1], GENES),
          identical(unname(as.matrix(Y_in[, -1])), unname(Y)))
DAT <- data.frame(cell = obs_in$cell,
                  donor = factor(obs_in$donor, levels = DONORS),
                  condition = factor(obs_in$condition, levels = CONDS))

## ------------------------------------------------------------------ fitting helpers
TIGHT <- lmerControl(optimizer = "bobyqa", optCtrl = list(rhoend = 1e-12, maxfun = 1e5),
                     check.conv.singular = "ignore")
TIGHT_CALL <- paste0('lmerControl(optimizer = "bobyqa", optCtrl = list(rhoend = 1e-12, ',
                     'maxfun = 1e5), check.conv.singular = "ignore")')
DEFAULT <- lmerControl()
EARLY_TOL <- 1e-8

## evaluate expr, collecting warnings / messages / error
capture <- function(expr) {
  w <- character(0); m <- character(0); err <- NULL
  val <- withCallingHandlers(
    tryCatch(expr, error = function(e) { err <<- conditionMessage(e); NULL }),
    warning = function(c) { w <<- c(w, conditionMessage(c)); invokeRestart("muffleWarning") },
    message = function(c) { m <<- c(m, sub("\n$", "", conditionMessage(c)))
                            invokeRestart("muffleMessage") })
  list(value = val, warnings = w, messages = m, error = err)
}
log_json <- function(cap) list(warnings = strarr(cap$warnings), messages = strarr(cap$messages),
                               error = if (is.null(cap$error)) NA else cap$error)

fit_one <- function(formula, d, control, start = NULL)
  lmerTest::lmer(formula, data = d, REML = TRUE, na.action = na.omit, control = control,
                 start = start)

coef_json <- function(tab, se_adj = NULL) {
  out <- list()
  for (r in rownames(tab)) {
    e <- list(estimate = num(tab[r, "Estimate"]), se = num(tab[r, "Std. Error"]),
              df = num(tab[r, "df"]), t = num(tab[r, "t value"]),
              p = num(tab[r, "Pr(>|t|)"]))
    if (!is.null(se_adj)) e$se_vcovAdj <- num(se_adj[r])
    out[[r]] <- e
  }
  out
}
opt_json <- function(m) {
  if (is.null(m)) return(NULL)
  oi <- m@optinfo
  list(optimizer = oi$optimizer, feval = if (is.null(oi$feval)) NA else oi$feval,
       conv = if (is.null(oi$conv$opt)) NA else oi$conv$opt,
       message = if (is.null(oi$message)) NA else as.character(oi$message),
       lme4_messages = strarr(unlist(oi$conv$lme4$messages)),
       REMLcrit = num(REMLcrit(m)),
       theta = numarr(getME(m, "theta")), sigma = num(sigma(m)))
}

## Candidate fits.  "tight" and "default" are the fits asked for; the others
## guard against local optima and against bobyqa stalling near the boundary
## (both happen for the slope model): tight bobyqa restarted from the default
## fit's theta, and tight bobyqa from a few fixed starting thetas.
STARTS <- list(
  intercept = list(0.01, 0.3, 3),
  slope = list(c(0.1, 0, 0.1), c(2, 0, 2), c(1, 1, 0.1), c(1, -1, 0.1),
               c(0.1, 1, 1), c(0.1, -1, 1))
)
TIE_TOL <- 1e-10      # a candidate replaces the tight fit only if lower by more than this

fit_gene <- function(mn, g) {
  formula <- MODELS[[mn]]
  d <- data.frame(DAT, y = Y_in[[g]])
  caps <- list()
  caps$tight <- capture(fit_one(formula, d, TIGHT))
  caps$default <- capture(fit_one(formula, d, DEFAULT))
  if (!is.null(caps$default$value))
    caps$tight_from_default <- capture(fit_one(formula, d, TIGHT,
                                               start = list(theta = getME(caps$default$value, "theta"))))
  for (k in seq_along(STARTS[[mn]]))
    caps[[sprintf("tight_start%d", k)]] <- capture(fit_one(formula, d, TIGHT,
                                                           start = list(theta = STARTS[[mn]][[k]])))
  crit <- vapply(caps, function(cp) if (is.null(cp$value)) NA_real_ else REMLcrit(cp$value), 0)
  mt <- caps$tight$value; md <- caps$default$value
  crit_t <- crit[["tight"]]; crit_d <- crit[["default"]]
  rec <- list(gene = g)
  if (all(is.na(crit))) {
    rec$status <- "error"
    rec$log <- list(fit_tight = log_json(caps$tight), fit_default = log_json(caps$default))
    return(rec)
  }
  best <- names(crit)[which.min(crit)]              # first minimum in candidate order
  used <- if (!is.na(crit_t) && crit_t - crit[[best]] <= TIE_TOL) "tight" else best
  m <- caps[[used]]$value
  crit_ref <- crit[[used]]
  if (!inherits(m, "lmerModLmerTest")) stop("lmerTest conversion failed for ", g)
  ## how well the optimum pins the parameters down: spread over the candidates
  ## whose criterion is within EARLY_TOL of the reference
  near <- names(crit)[!is.na(crit) & crit - crit_ref <= EARLY_TOL]
  se_ct <- function(x) sqrt(as.matrix(vcov(x))["conditiontrt", "conditiontrt"])
  near_j <- list(
    n = length(near), candidates = strarr(near),
    theta_max_abs_diff = num(max(vapply(near, function(k)
      max(abs(getME(caps[[k]]$value, "theta") - getME(m, "theta"))), 0))),
    sigma_max_rel_diff = num(max(vapply(near, function(k)
      abs(sigma(caps[[k]]$value) / sigma(m) - 1), 0))),
    estimate_conditiontrt_max_abs_diff = num(max(vapply(near, function(k)
      abs(fixef(caps[[k]]$value)[["conditiontrt"]] - fixef(m)[["conditiontrt"]]), 0))),
    se_conditiontrt_max_rel_diff = num(max(vapply(near, function(k)
      abs(se_ct(caps[[k]]$value) / se_ct(m) - 1), 0))))

  fe <- fixef(m); se <- sqrt(diag(as.matrix(vcov(m))))
  fixef_j <- list()
  for (nm in names(fe)) fixef_j[[nm]] <- list(estimate = num(fe[[nm]]), se = num(se[[nm]]))
  vc <- as.data.frame(VarCorr(m))
  vc_j <- lapply(seq_len(nrow(vc)), function(i)
    list(grp = vc$grp[i], var1 = vc$var1[i], var2 = vc$var2[i],
         vcov = num(vc$vcov[i]), sdcor = num(vc$sdcor[i])))

  cap_s <- capture(summary(m, ddf = "Satterthwaite")$coefficients)
  cap_k <- capture({
    tab <- summary(m, ddf = "Kenward-Roger")$coefficients
    list(tab = tab, se_adj = sqrt(diag(as.matrix(pbkrtest::vcovAdj(m)))))
  })
  sat_j <- if (is.null(cap_s$value)) NA else coef_json(cap_s$value)
  kr_j <- if (is.null(cap_k$value)) NA else {
    sa <- cap_k$value$se_adj; names(sa) <- names(fe)
    coef_json(cap_k$value$tab, sa)
  }

  rec <- c(rec, list(
    status = "ok",
    nobs = nobs(m),
    n_missing = sum(is.na(d$y)),
    ngrps = unname(ngrps(m)[["donor"]]),
    REMLcrit = num(REMLcrit(m)),
    logLik = num(as.numeric(logLik(m))),
    sigma = num(sigma(m)),
    theta = numarr(getME(m, "theta")),
    theta_names = strarr(names(getME(m, "theta"))),
    varcorr = vc_j,
    fixef = fixef_j,
    is_singular = isSingular(m, tol = 1e-4),
    satterthwaite = sat_j,
    kenward_roger = kr_j,
    optimizer = list(
      used = used,
      criterion_tight = num(crit_t),
      criterion_default = num(crit_d),
      default_minus_tight = num(crit_d - crit_t),
      default_minus_reference = num(crit_d - crit_ref),
      tight_minus_reference = num(crit_t - crit_ref),
      default_stopped_early = isTRUE(crit_d - crit_ref > EARLY_TOL),
      tight_stopped_early = isTRUE(crit_t - crit_ref > EARLY_TOL),
      candidates = lapply(as.list(crit), num),
      near_optimal = near_j,
      tight = opt_json(mt),
      default = opt_json(md),
      reference = opt_json(m)),
    log = c(list(fit_tight = log_json(caps$tight), fit_default = log_json(caps$default)),
            if (!used %in% c("tight", "default")) list(fit_reference = log_json(caps[[used]])),
            list(satterthwaite = log_json(cap_s), kenward_roger = log_json(cap_k)))
  ))
  rec
}

## ------------------------------------------------------------------ fit all genes
MODELS <- list(
  intercept = y ~ condition + (1 | donor),
  slope     = y ~ condition + (1 + condition | donor)
)
fstr <- function(f) paste(trimws(deparse(f, width.cutoff = 500L)), collapse = " ")

results <- list(); summ <- list()
for (mn in names(MODELS)) {
  cat(sprintf("model %s: %s\n", mn, fstr(MODELS[[mn]])))
  genes <- list()
  for (g in GENES) {
    r <- tryCatch(fit_gene(mn, g),
                  error = function(e) list(gene = g, status = "error",
                                           log = list(error = conditionMessage(e))))
    genes[[g]] <- r[names(r) != "gene"]
  }
  ok <- vapply(genes, function(r) identical(r$status, "ok"), TRUE)
  sing <- vapply(genes, function(r) isTRUE(r$is_singular), TRUE)
  early <- vapply(genes, function(r) isTRUE(r$optimizer$default_stopped_early), TRUE)
  early_t <- vapply(genes, function(r) isTRUE(r$optimizer$tight_stopped_early), TRUE)
  used <- vapply(genes, function(r) if (is.null(r$optimizer$used)) "error" else r$optimizer$used, "")
  usedd <- used != "tight"
  summ[[mn]] <- list(n_ok = sum(ok), n_error = sum(!ok),
                     n_singular = sum(sing), singular_genes = strarr(GENES[sing]),
                     n_default_stopped_early = sum(early),
                     default_stopped_early_genes = strarr(GENES[early]),
                     n_tight_stopped_early = sum(early_t),
                     tight_stopped_early_genes = strarr(GENES[early_t]),
                     n_reference_not_tight = sum(usedd),
                     reference_not_tight = lapply(as.list(used[usedd]), identity))
  names(summ[[mn]]$reference_not_tight) <- GENES[usedd]   # {} when empty
  cat(sprintf("  ok %d, errors %d, singular %d, default early %d, tight early %d, reference not tight %d\n",
              sum(ok), sum(!ok), sum(sing), sum(early), sum(early_t), sum(usedd)))
  print(table(used))
  results[[mn]] <- list(formula = fstr(MODELS[[mn]]), genes = genes)
}

## ------------------------------------------------------------------ timing (informational)
now_ms <- function() as.numeric(Sys.time()) * 1000
timing <- list()
for (mn in names(MODELS)) {
  tl <- matrix(NA_real_, G, 4, dimnames = list(GENES, c("lme4", "fit_satt", "kr", "tight_fit")))
  for (g in GENES) {
    d <- data.frame(DAT, y = Y_in[[g]])
    suppressWarnings(suppressMessages({
      t0 <- now_ms()
      lme4::lmer(MODELS[[mn]], data = d, REML = TRUE, na.action = na.omit)
      t1 <- now_ms()
      m <- fit_one(MODELS[[mn]], d, DEFAULT)
      s <- summary(m, ddf = "Satterthwaite")
      t2 <- now_ms()
      k <- try(summary(m, ddf = "Kenward-Roger"), silent = TRUE)
      t3 <- now_ms()
      fit_one(MODELS[[mn]], d, TIGHT)
      t4 <- now_ms()
    }))
    tl[g, ] <- c(t1 - t0, t2 - t1, t3 - t2, t4 - t3)
  }
  timing[[mn]] <- list(
    mean_ms_lme4_lmer_default = num(round(mean(tl[, 1]), 2)),
    mean_ms_lmerTest_fit_plus_satterthwaite_summary = num(round(mean(tl[, 2]), 2)),
    mean_ms_extra_kenward_roger_summary = num(round(mean(tl[, 3]), 2)),
    mean_ms_lmerTest_fit_tight_control = num(round(mean(tl[, 4]), 2)))
}

## ------------------------------------------------------------------ meta + write
pv <- function(p) as.character(packageVersion(p))
sim_genes <- list()
for (g in idx) sim_genes[[GENES[g]]] <- list(
  b0 = num(truth$b0[g]), b1 = num(truth$b1[g]), donor_sd = num(truth$donor_sd[g]),
  slope_sd = num(truth$slope_sd[g]), sigma = num(truth$sigma[g]),
  na_pattern = truth$na_pattern[g], na_detail = truth$na_detail[g],
  n_missing = truth$n_missing[g])
cc <- list(); for (dn in DONORS) cc[[dn]] <- list(ctl = counts[dn, "ctl"], trt = counts[dn, "trt"])

meta <- list(
  generator = "tests/r/make_batch_reference.R",
  regenerate = "Rscript tests/r/make_batch_reference.R   (from the repo root)",
  versions = list(R = R.version.string, lme4 = pv("lme4"), lmerTest = pv("lmerTest"),
                  pbkrtest = pv("pbkrtest"), Matrix = pv("Matrix"), minqa = pv("minqa"),
                  nloptr = pv("nloptr"), jsonlite = pv("jsonlite")),
  seed = SEED,
  data = list(obs = "obs.csv", Y = "Y.csv", n = n, G = G,
              genes = strarr(GENES), donors = strarr(DONORS), conditions = strarr(CONDS),
              factor_levels = list(donor = strarr(DONORS), condition = strarr(CONDS)),
              cell_counts = cc,
              na_patterns = lapply(NA_PATTERNS, function(v) strarr(GENES[v]))),
  simulation = list(
    model = "y = b0 + b1*trt + u0[donor] + u1[donor]*trt + e; u0 ~ N(0, donor_sd^2), u1 ~ N(0, slope_sd^2) independent, e ~ N(0, sigma^2)",
    genes = sim_genes),
  fit = list(
    call = "lmerTest::lmer(formula, data = d, REML = TRUE, na.action = na.omit, control = ctrl)",
    data_note = "d = obs.csv with donor = factor(levels D1..D8), condition = factor(levels ctl, trt), y = the gene's column of Y.csv; rows with NA y are dropped (na.omit), unused donor levels are dropped by lme4",
    contrasts = "contr.treatment (reference level ctl; coefficient conditiontrt)",
    reference_control = TIGHT_CALL,
    default_control = "lmerControl()",
    reference_rule = paste(
      "candidates (optimizer.candidates): tight = reference_control from lme4's default start;",
      "default = lmerControl(); tight_from_default = reference_control started at the default fit's theta;",
      "tight_start<k> = reference_control started at meta.fit.starts[model][k].",
      sprintf("The reference is the tight fit unless another candidate's REMLcrit is lower by more than %g;", TIE_TOL),
      "then it is the candidate with the lowest REMLcrit. optimizer.used names it."),
    starts = lapply(STARTS, function(l) lapply(l, numarr)),
    tie_tol = num(TIE_TOL),
    default_stopped_early_rule = sprintf("criterion_default - REMLcrit(reference) > %g", EARLY_TOL),
    near_optimal = sprintf("optimizer.near_optimal: spread of theta, sigma, conditiontrt estimate and SE (sqrt(diag(vcov))) over the candidates whose REMLcrit is within %g of the reference", EARLY_TOL),
    tight_stopped_early_rule = sprintf("criterion_tight - REMLcrit(reference) > %g", EARLY_TOL),
    is_singular = "isSingular(m, tol = 1e-4)",
    varcorr = "as.data.frame(VarCorr(m)) rows: grp, var1, var2 (null for variances), vcov, sdcor",
    fixef_se = "sqrt(diag(vcov(m)))",
    satterthwaite = 'summary(m, ddf = "Satterthwaite")$coefficients (lmerTest)',
    kenward_roger = 'summary(m, ddf = "Kenward-Roger")$coefficients (lmerTest, via pbkrtest); se_vcovAdj = sqrt(diag(pbkrtest::vcovAdj(m)))'),
  summary = summ,
  timing = c(list(note = paste("informational, not deterministic; mean ms per gene over", G,
                               "genes, single R process; fit_plus_satterthwaite = lmerTest::lmer (default control, includes lmerTest's Hessian/Jacobian) + summary(ddf = 'Satterthwaite'); kenward_roger is extra on top"),
                  total_script_seconds = NA),
             timing),
  notes = strarr(c(
    "Numbers are written with the shortest of %.15g/%.16g/%.17g that round-trips (jsonlite itself stops at 15 digits); null = NA/NaN/Inf.",
    "Y.csv: simulated values rounded to 6 decimals, written with the same round-trip formatting (so the CSV holds exactly the values R fitted); 'NA' marks missing values.",
    "Genes with donor_sd = 0 in the simulation: gene001..gene020 (gene016..gene020 have a nonzero donor x condition slope).",
    "donor_all genes are fitted with 7 donors (ngrps = 7)."))
)
meta$timing$total_script_seconds <- num(round(as.numeric(difftime(Sys.time(), T_START, units = "secs")), 1))

out <- list(meta = meta, models = results)
write_json(out, file.path(OUT, "reference.json"), auto_unbox = TRUE, pretty = 1,
           na = "null", null = "null", json_verbatim = TRUE, digits = NA)
cat(sprintf("wrote %s (n = %d, G = %d) in %.1f s\n", OUT, n, G,
            as.numeric(difftime(Sys.time(), T_START, units = "secs"))))
