#!/usr/bin/env Rscript
## make_structure_cases.R -- R reference values for lmmjax covariance-structure
## tests: residual correlation / variance structures (nlme::gls, nlme::lme) and
## structured random-effect covariances (glmmTMB).
##
## Writes, under tests/fixtures/structures/ (relative to the repo root):
##   data/<name>.csv            the simulated datasets (write.csv, row.names = FALSE)
##   cases/<case>.json          one fitted model per file
##   glmmtmb_covstructs.json    the covariance-structure keywords of the installed
##                              glmmTMB and how each one is parameterised
## Orthodont is read from tests/fixtures/reference/data/Orthodont.csv (the copy
## of the shared reference data set) and is not written again.
##
## The nlme cases use the JSON layout of the nlme cases of the shared reference
## (shared/reference/make_reference.R, nlme_case); the glmmTMB cases use the
## same top-level keys where they make sense.  Every case also has
##   structure_parameters   natural-scale structure parameters with clear names
##   random_effects         per grouping factor: terms, cov, stddev, correlation
##   sigma                  the residual SD
## (see tests/fixtures/structures/README.md for the naming convention).
## Every model is fitted to the CSV *as read back from disk* with factor level
## order restored.  Simulated data use a fixed set.seed per dataset.
##
## Usage (from the repo root):  Rscript tests/r/make_structure_cases.R [--out=DIR]
##   --out   folder that receives cases/ and data/
##           (default: tests/fixtures/structures next to this script's folder)
##
## Needs (Debian): r-base-core r-cran-nlme r-cran-lme4 r-cran-glmmtmb r-cran-jsonlite

suppressPackageStartupMessages({
  library(nlme)
  library(lme4)
  library(glmmTMB)
  library(jsonlite)
})
options(contrasts = c("contr.treatment", "contr.poly"), warn = 1)
RNGkind("Mersenne-Twister", "Inversion", "Rejection")

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
OUT <- normalizePath(get_opt("out", file.path(script_dir, "..", "fixtures", "structures")),
                     mustWork = FALSE)
for (sub in c("cases", "data"))
  dir.create(file.path(OUT, sub), recursive = TRUE, showWarnings = FALSE)
OUT <- normalizePath(OUT)
REF_DATA <- normalizePath(file.path(script_dir, "..", "fixtures", "reference", "data"),
                          mustWork = TRUE)

pkg_versions <- function(pkgs) {
  c(list(R = R.version.string),
    setNames(lapply(pkgs, function(p) as.character(utils::packageVersion(p))), pkgs))
}
GENERATOR <- list(script = "tests/r/make_structure_cases.R",
                  versions = pkg_versions(c("nlme", "lme4", "glmmTMB", "TMB", "Matrix",
                                            "jsonlite")))

## ------------------------------------------------------------------ helpers
## JSON: always an array, even for length 0 or 1 (auto_unbox is on globally)
arr <- function(x) {
  if (is.null(x)) x <- character(0)
  I(unname(as.vector(x)))
}
named_vec <- function(x) list(names = arr(names(x)), values = arr(x))
num_mat <- function(m) unname(matrix(as.numeric(as.matrix(m)), nrow(as.matrix(m))))
mat_json <- function(m) {
  if (is.null(m)) return(NA)
  m <- as.matrix(m)
  list(rownames = arr(rownames(m)), colnames = arr(colnames(m)), values = num_mat(m))
}
first_n <- function(x, n = 20) arr(head(unname(as.numeric(x)), n))
fstr <- function(f) paste(trimws(deparse(f, width.cutoff = 500L)), collapse = " ")
or_na <- function(x) if (is.null(x) || length(x) == 0) NA else x
empty_obj <- function() structure(list(), names = character(0))

write_case <- function(obj, id) {
  path <- file.path(OUT, "cases", paste0(id, ".json"))
  jsonlite::write_json(obj, path, digits = NA, auto_unbox = TRUE, na = "null",
                       pretty = TRUE)
  cat(sprintf("  -> cases/%s.json\n", id))
  CASES[[id]] <- obj
  invisible(path)
}
CASES <- new.env()

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

## ------------------------------------------------------------------ data
plain_df <- function(df) {
  out <- lapply(as.list(as.data.frame(df)), function(x) {
    if (is.factor(x)) factor(as.character(x), levels = levels(x)) else as.vector(x)
  })
  data.frame(out, check.names = FALSE, stringsAsFactors = FALSE)
}
## Read a CSV back and restore the factor columns (levels from `levs`).
read_back <- function(path, levs) {
  back <- utils::read.csv(path, stringsAsFactors = FALSE, check.names = FALSE)
  for (f in names(levs)) {
    back[[f]] <- factor(as.character(back[[f]]), levels = levs[[f]])
    stopifnot(!anyNA(back[[f]]))
  }
  back
}
check_same <- function(back, df) {
  stopifnot(identical(names(back), names(df)), nrow(back) == nrow(df))
  for (v in names(df)) {
    if (is.factor(df[[v]])) stopifnot(identical(as.character(back[[v]]), as.character(df[[v]])))
    else if (is.numeric(df[[v]]))
      stopifnot(isTRUE(all.equal(as.numeric(back[[v]]), as.numeric(df[[v]]), tolerance = 1e-13)))
    else stopifnot(identical(as.character(back[[v]]), as.character(df[[v]])))
  }
}
factor_levels_of <- function(df) {
  fac <- names(df)[vapply(df, is.factor, logical(1))]
  lapply(setNames(fac, fac), function(f) levels(df[[f]]))
}
## Write data/<name>.csv, read it back, restore factors; return the read-back data.
export_data <- function(df, name, source) {
  file <- paste0(name, ".csv")
  path <- file.path(OUT, "data", file)
  levs <- factor_levels_of(df)
  utils::write.csv(df, path, row.names = FALSE)
  back <- read_back(path, levs)
  check_same(back, df)
  cat(sprintf("  data/%s: %d rows x %d cols\n", file, nrow(back), ncol(back)))
  list(data = back, file = file, path = paste0("tests/fixtures/structures/data/", file),
       source = source, levels = levs)
}
## A dataset that already exists in tests/fixtures/reference/data/.
existing_data <- function(df, name, source) {
  file <- paste0(name, ".csv")
  levs <- factor_levels_of(df)
  back <- read_back(file.path(REF_DATA, file), levs)
  check_same(back, df)
  cat(sprintf("  (tests/fixtures/reference/data/%s: %d rows x %d cols)\n", file,
              nrow(back), ncol(back)))
  list(data = back, file = file, path = paste0("tests/fixtures/reference/data/", file),
       source = source, levels = levs)
}
levels_json <- function(ds) {
  if (!length(ds$levels)) return(empty_obj())
  lapply(ds$levels, arr)
}

## ------------------------------------------------------------------ shared pieces
## One random-effects block: the covariance matrix with its SDs and correlations.
re_block <- function(cov, type, extra = list()) {
  cov <- as.matrix(cov)
  sd <- sqrt(diag(cov))
  cor <- cov / outer(sd, sd)
  diag(cor) <- 1
  c(list(type = type, terms = arr(colnames(cov)), cov = num_mat(cov),
         stddev = arr(sd), correlation = num_mat(cor)), extra)
}
## "<g>:sd:<term>" and "<g>:cor(<t1>,<t2>)" (i < j, row-major upper triangle).
sd_cor_params <- function(g, blk, with_cor = TRUE) {
  tn <- as.character(blk$terms)
  sd <- as.numeric(blk$stddev)
  nm <- paste0(g, ":sd:", tn); val <- sd
  if (with_cor && length(tn) > 1) {
    C <- blk$correlation
    for (i in seq_len(length(tn) - 1)) for (j in (i + 1):length(tn)) {
      nm <- c(nm, sprintf("%s:cor(%s,%s)", g, tn[i], tn[j])); val <- c(val, C[i, j])
    }
  }
  setNames(val, nm)
}

## ------------------------------------------------------------------ nlme cases
iv_records <- function(m) {
  m <- as.matrix(m)
  data.frame(parm = rownames(m), lower = unname(m[, "lower"]), est = unname(m[, "est."]),
             upper = unname(m[, "upper"]), stringsAsFactors = FALSE)
}
intervals_json <- function(iv) {
  if (is.null(iv)) return(NA)
  out <- list()
  for (nm in names(iv)) {
    x <- iv[[nm]]
    if (nm == "reStruct") {
      for (g in names(x)) out[[paste0("reStruct.", g)]] <- iv_records(x[[g]])
    } else if (is.matrix(x) || is.data.frame(x)) {
      out[[nm]] <- iv_records(x)
    } else if (is.numeric(x)) {
      out[[nm]] <- list(lower = unname(x[["lower"]]), est = unname(x[["est."]]),
                        upper = unname(x[["upper"]]))
    }
  }
  out
}
struct_coef <- function(s, unconstrained) {
  if (is.null(s) || length(coef(s, unconstrained = unconstrained)) == 0) return(NA)
  named_vec(coef(s, unconstrained = unconstrained))
}

## Natural-scale residual-structure parameters of a gls/lme fit, with the names
## of the README: Phi, Rho, cor(i,j), range, nugget, power, ratio:<level>.
nlme_residual_params <- function(ms) {
  out <- numeric(0)
  cs <- ms$corStruct
  if (!is.null(cs)) {
    v <- coef(cs, unconstrained = FALSE)
    cls <- class(cs)[1]
    if (cls %in% c("corAR1", "corCAR1") ||
        (cls == "corARMA" && identical(names(v), "Phi1"))) {
      ## nlme turns corAR1 into corARMA(p = 1) (coefficient "Phi1") when the
      ## positions of some group have gaps; it is the same AR(1) model
      names(v) <- "Phi"
    } else if (cls == "corCompSymm") {
      names(v) <- "Rho"
    } else if (cls == "corSymm") {
      n <- (1 + sqrt(1 + 8 * length(v))) / 2
      pr <- utils::combn(n, 2)
      names(v) <- sprintf("cor(%d,%d)", pr[1, ], pr[2, ])
    }  # corExp etc.: nlme's names (range, nugget)
    out <- c(out, v)
  }
  vs <- ms$varStruct
  if (!is.null(vs)) {
    v <- coef(vs, unconstrained = FALSE)
    if (inherits(vs, "varIdent")) names(v) <- paste0("ratio:", names(v))
    out <- c(out, v)
  }
  out
}

GLS_ML_SE_NOTE <- "nlme::gls with method = 'ML' reports vcov / se (and t, p) with sigma^2 scaled by N / (N - p): fixed.se = sqrt(N / (N - p)) * sqrt(diag(sigma_ML^2 (X' Lambda^-1 X)^-1)) (checked by direct computation for orthodont_gls_ar1_ml). fixed.se_gls_at_ml and fixed.vcov_gls_at_ml undo that factor: they are the plain GLS values at the ML estimates (what lme4-style ML code computes)."

## build: function(data) returning the fitted gls/lme object.
## spec: list of strings describing the model (fixed, random, correlation, weights).
## descr: named character vector, one line per structure parameter.
nlme_case <- function(id, build, ds, spec, group, notes = character(0), descr = character(0)) {
  cat(sprintf("[nlme] %s\n", id))
  log_reset()
  fit <- capture(build(ds$data), "fit")
  res <- list(case = id, engine = NA, dataset = ds$file, dataset_path = ds$path,
              dataset_source = ds$source, model = spec, factor_levels = levels_json(ds),
              notes = arr(notes))
  if (is.null(fit)) {
    res$log <- log_json(); res$generator <- GENERATOR
    write_case(res, id)
    return(invisible(NULL))
  }
  is_lme <- inherits(fit, "lme")
  res$engine <- if (is_lme) "nlme::lme" else "nlme::gls"
  res$call <- paste(trimws(deparse(fit$call, width.cutoff = 500L)), collapse = " ")
  tt <- summary(fit)$tTable
  n <- nobs(fit)
  V <- as.matrix(vcov(fit))
  ms <- fit$modelStruct
  ll <- logLik(fit)
  first_group <- levels(ds$data[[group]])[1]

  ## random effects per grouping factor (lme only; a single level of grouping here)
  re_list <- empty_obj()
  sp <- nlme_residual_params(ms)
  if (is_lme) {
    for (g in names(ms$reStruct)) {
      pd <- ms$reStruct[[g]]
      covm <- as.matrix(pd) * fit$sigma^2
      re_list[[g]] <- re_block(covm, class(pd)[1])
      sp <- c(sd_cor_params(g, re_list[[g]]), sp)
    }
  }
  vs <- ms$varStruct
  res <- c(res, list(
    method = fit$method, REML = identical(fit$method, "REML"),
    nobs = n,
    fixed = list(names = arr(rownames(tt)), estimate = arr(tt[, "Value"]),
                 se = arr(tt[, "Std.Error"]),
                 df = if (is_lme) arr(tt[, "DF"]) else arr(rep(n - nrow(tt), nrow(tt))),
                 t = arr(tt[, "t-value"]), p = arr(tt[, "p-value"]),
                 vcov = unname(V)),
    logLik = as.numeric(ll), logLik_df = attr(ll, "df"),
    AIC = AIC(fit), BIC = BIC(fit), sigma = fit$sigma,
    structure_parameters = named_vec(sp),
    structure_parameters_description = if (length(descr)) as.list(descr) else empty_obj(),
    random_effects = re_list,
    varStruct_levels = if (inherits(vs, "varIdent")) arr(attr(vs, "groupNames")) else NA,
    modelStruct = named_vec(coef(ms, unconstrained = FALSE)),
    modelStruct_unconstrained = named_vec(coef(ms, unconstrained = TRUE)),
    corStruct = struct_coef(ms$corStruct, FALSE),
    cor_matrix_first_group = if (is.null(ms$corStruct)) NA else
      or_na(capture(unname(as.matrix(nlme::corMatrix(ms$corStruct)[[first_group]])),
                    "corMatrix")),
    varStruct = struct_coef(ms$varStruct, FALSE),
    varWeights_first20 = if (is.null(vs)) NA else first_n(nlme::varWeights(vs)),
    apVar = if (is.matrix(fit$apVar))
      list(names = arr(rownames(fit$apVar)), values = unname(fit$apVar),
           Pars = named_vec(attr(fit$apVar, "Pars"))) else or_na(as.character(fit$apVar)),
    intervals = intervals_json(capture(nlme::intervals(fit), "intervals"))
  ))
  if (!is_lme && identical(fit$method, "ML")) {
    k <- sqrt((n - nrow(tt)) / n)
    res$fixed$se_gls_at_ml <- arr(tt[, "Std.Error"] * k)
    res$fixed$vcov_gls_at_ml <- unname(V * k^2)
    res$notes <- arr(c(res$notes, GLS_ML_SE_NOTE))
  }
  if (is_lme) {
    res$ngroups <- as.list(fit$dims$ngrps[seq_len(fit$dims$Q)])
    res$random_effects_cov <- mat_json(capture(unclass(nlme::getVarCov(fit, type = "random.effects")), "getVarCov(random.effects)"))
    mg <- capture(nlme::getVarCov(fit, type = "marginal", individuals = first_group), "getVarCov(marginal)")
    res$marginal_cov_first_group <- if (is.null(mg)) NA else
      list(group = first_group, values = num_mat(mg[[1]]))
    re <- nlme::ranef(fit)
    res$ranef <- list(levels = arr(rownames(re)), terms = arr(colnames(re)),
                      values = unname(as.matrix(re)))
    res$fitted_fixed_first20 <- first_n(fitted(fit, level = 0))
    res$fitted_first20 <- first_n(fitted(fit, level = 1))
    res$residuals_first20 <- first_n(residuals(fit, level = 1))
  } else if (is.null(ms$corStruct)) {
    ## getVarCov() refuses uncorrelated errors: diagonal sigma^2 / w^2
    rows <- which(ds$data[[group]] == first_group)
    w <- if (is.null(vs)) rep(1, n) else nlme::varWeights(vs)
    res$marginal_cov_first_group <- list(group = first_group,
                                         values = num_mat(diag((fit$sigma / w[rows])^2)))
    res$fitted_first20 <- first_n(fitted(fit))
    res$residuals_first20 <- first_n(residuals(fit))
  } else {
    mg <- capture(nlme::getVarCov(fit, individual = first_group), "getVarCov")
    res$marginal_cov_first_group <- if (is.null(mg)) NA else
      list(group = first_group, values = num_mat(mg))
    res$fitted_first20 <- first_n(fitted(fit))
    res$residuals_first20 <- first_n(residuals(fit))
  }
  res$log <- log_json()
  res$generator <- GENERATOR
  write_case(res, id)
  invisible(fit)
}

## ------------------------------------------------------------------ glmmTMB cases
COVSTRUCT <- glmmTMB:::.valid_covstruct   # named integer codes: diag us cs ar1 ...
covstruct_name <- function(code) names(COVSTRUCT)[match(code, COVSTRUCT)]

## Natural-scale parameters of one glmmTMB term from its internal theta, using
## the transforms of glmmTMB's TMB template (src/glmmTMB.cpp, termwise_nll).
theta_to_natural <- function(type, th, n) {
  switch(type,
    diag = list(sd = exp(th)),
    us = {
      sd <- exp(th[seq_len(n)])
      L <- diag(n)
      if (n > 1) {  # row-major fill of the strict lower triangle, as UNSTRUCTURED_CORR_t
        k <- 0
        for (i in 2:n) for (j in 1:(i - 1)) { k <- k + 1; L[i, j] <- th[n + k] }
      }
      S <- L %*% t(L)
      C <- S / sqrt(outer(diag(S), diag(S)))
      list(sd = sd, cor = C)
    },
    cs = {
      a <- 1 / (n - 1)
      list(sd = exp(th[seq_len(n)]), rho = plogis(th[n + 1]) * (1 + a) - a)
    },
    ar1 = list(sd = rep(exp(th[1]), n), rho = th[2] / sqrt(1 + th[2]^2)),
    NULL)
}

## Marginal covariance of the rows of the first level of the first grouping
## factor: Z G Z' + sigma^2 I (G block-diagonal, from VarCorr).
tmb_marginal_first <- function(m, vc, grp, level) {
  Z <- as.matrix(getME(m, "Z"))
  rows <- which(m$frame[[grp]] == level)
  rt <- m$modelInfo$reTrms$cond
  G <- matrix(0, ncol(Z), ncol(Z))
  off <- 0
  for (k in seq_along(rt$cnms)) {
    S <- as.matrix(vc[[k]]); nt <- nrow(S)
    nl <- nlevels(rt$flist[[attr(rt$flist, "assign")[k]]])
    G[off + seq_len(nt * nl), off + seq_len(nt * nl)] <- kronecker(diag(nl), S)
    off <- off + nt * nl
  }
  Zi <- Z[rows, , drop = FALSE]
  V <- Zi %*% G %*% t(Zi) + sigma(m)^2 * diag(length(rows))
  list(group = level, rows = arr(rows), values = num_mat(V))
}

## crosscheck: function(data, m) returning a list(engine, call, fit, relation, mapped)
tmb_case <- function(id, formula, ds, group, REML = TRUE, dispformula = ~ 1, map = NULL,
                     notes = character(0), crosscheck = NULL, descr = character(0)) {
  cat(sprintf("[glmmTMB] %s\n", id))
  map_str <- fstr(substitute(map))
  log_reset()
  d <- ds$data
  fit <- capture(
    if (is.null(map)) glmmTMB::glmmTMB(formula, data = d, dispformula = dispformula, REML = REML)
    else glmmTMB::glmmTMB(formula, data = d, dispformula = dispformula, REML = REML, map = map),
    "fit")
  no_disp <- identical(deparse(dispformula), "~0")
  res <- list(case = id, engine = "glmmTMB::glmmTMB", dataset = ds$file,
              dataset_path = ds$path, dataset_source = ds$source,
              model = list(formula = fstr(formula), family = "gaussian(link = \"identity\")",
                           dispformula = fstr(dispformula),
                           map = if (is.null(map)) NA else lapply(map, function(f) arr(as.integer(f)))),
              factor_levels = levels_json(ds), notes = arr(notes))
  if (is.null(fit)) {
    res$log <- log_json(); res$generator <- GENERATOR
    write_case(res, id)
    return(invisible(NULL))
  }
  res$call <- sprintf("glmmTMB::glmmTMB(%s, data = d, dispformula = %s, REML = %s%s)",
                      fstr(formula), fstr(dispformula), REML,
                      if (is.null(map)) "" else paste0(", map = ", map_str))
  sm <- summary(fit)$coefficients$cond
  V <- as.matrix(vcov(fit)$cond)
  ll <- logLik(fit)
  vc <- VarCorr(fit)$cond
  rs <- fit$modelInfo$reStruc$condReStruc
  th_all <- getME(fit, "theta")
  rt <- fit$modelInfo$reTrms$cond

  re_list <- empty_obj()
  sp <- numeric(0)
  theta_list <- empty_obj()
  param_check <- 0
  off <- 0
  for (k in seq_along(vc)) {
    g <- names(vc)[k]
    type <- covstruct_name(rs[[k]]$blockCode)
    nth <- rs[[k]]$blockNumTheta
    th <- th_all[off + seq_len(nth)]
    off <- off + nth
    S <- as.matrix(vc[[k]])
    blk <- re_block(S, type, list(
      stddev_attr = arr(attr(vc[[k]], "stddev")),
      correlation_attr = num_mat(attr(vc[[k]], "correlation")),
      term_label = names(rs)[k], blockSize = rs[[k]]$blockSize,
      blockReps = rs[[k]]$blockReps, theta = arr(th)))
    re_list[[g]] <- blk
    tn <- as.character(blk$terms)
    nat <- theta_to_natural(type, th, length(tn))
    if (type %in% c("us", "diag")) {
      sp <- c(sp, sd_cor_params(g, blk, with_cor = type == "us"))
      param_check <- max(param_check, abs(nat$sd - blk$stddev))
      if (type == "us") param_check <- max(param_check, abs(nat$cor - blk$correlation))
    } else if (type == "ar1") {
      sp <- c(sp, setNames(c(blk$stddev[1], blk$correlation[2, 1]),
                           paste0(g, c(":sd", ":Phi"))))
      param_check <- max(param_check, abs(nat$sd - blk$stddev),
                         abs(nat$rho^abs(outer(seq_along(tn), seq_along(tn), "-")) - blk$correlation))
    } else if (type == "cs") {
      sp <- c(sp, setNames(c(blk$stddev, blk$correlation[2, 1]),
                           c(paste0(g, ":sd:", tn), paste0(g, ":Rho"))))
      Cn <- matrix(nat$rho, length(tn), length(tn)); diag(Cn) <- 1
      param_check <- max(param_check, abs(nat$sd - blk$stddev), abs(Cn - blk$correlation))
    } else {
      sp <- c(sp, sd_cor_params(g, blk))
      param_check <- NA
    }
  }
  first_level <- levels(d[[group]])[1]
  rr <- ranef(fit)$cond
  res <- c(res, list(
    method = if (REML) "REML" else "ML", REML = isTRUE(fit$modelInfo$REML),
    nobs = nobs(fit),
    ngrps = lapply(rt$flist, nlevels),
    fixed = list(names = arr(rownames(sm)), estimate = arr(sm[, "Estimate"]),
                 se = arr(sm[, "Std. Error"]), z = arr(sm[, "z value"]),
                 p = arr(sm[, "Pr(>|z|)"]), vcov = unname(V)),
    logLik = as.numeric(ll), logLik_df = attr(ll, "df"),
    AIC = AIC(fit), BIC = BIC(fit), df_residual = df.residual(fit),
    sigma = sigma(fit),
    dispersion_fixed = no_disp,
    betad = named_vec(fixef(fit)$disp),
    structure_parameters = named_vec(sp),
    structure_parameters_description = if (length(descr)) as.list(descr) else empty_obj(),
    random_effects = re_list,
    theta = arr(th_all),
    theta_to_natural_max_abs_diff = param_check,
    marginal_cov_first_group = capture(tmb_marginal_first(fit, vc, names(rt$flist)[1], first_level),
                                       "marginal covariance"),
    ranef_first5 = lapply(rr, function(r) list(levels = arr(head(rownames(r), 5)),
                                                terms = arr(colnames(r)),
                                                values = unname(as.matrix(head(r, 5))))),
    convergence = list(optimizer = "nlminb", code = fit$fit$convergence,
                       message = or_na(fit$fit$message), iterations = or_na(fit$fit$iterations),
                       pdHess = fit$sdr$pdHess,
                       max_abs_gradient = max(abs(fit$sdr$gradient.fixed))),
    fitted_first20 = first_n(fitted(fit)),
    residuals_first20 = first_n(residuals(fit, type = "response")),
    predict_fixed_first20 = first_n(predict(fit, re.form = NA))
  ))
  if (!is.null(crosscheck)) {
    cc <- capture(crosscheck(d, fit), "crosscheck")
    if (!is.null(cc)) {
      other_fixed <- cc$fixed
      res$crosscheck <- list(
        engine = cc$engine, call = cc$call, relation = cc$relation,
        logLik = cc$logLik, logLik_diff = as.numeric(ll) - cc$logLik,
        fixed_max_abs_diff = max(abs(sm[, "Estimate"] - other_fixed$estimate)),
        se_max_abs_diff = max(abs(sm[, "Std. Error"] - other_fixed$se)),
        se_max_rel_diff = max(abs(sm[, "Std. Error"] / other_fixed$se - 1)),
        mapped = if (is.null(cc$mapped)) NA else
          data.frame(name = names(cc$mapped),
                     glmmTMB = vapply(cc$mapped, `[`, numeric(1), 1),
                     other = vapply(cc$mapped, `[`, numeric(1), 2),
                     stringsAsFactors = FALSE, row.names = NULL))
    }
  }
  res$log <- log_json()
  res$generator <- GENERATOR
  write_case(res, id)
  invisible(fit)
}
## fixed-effect summaries of the comparison fits
fx_gls <- function(f) { tt <- summary(f)$tTable; list(estimate = tt[, "Value"], se = tt[, "Std.Error"]) }
## nlme::gls with method = "ML" scales its vcov by N / (N - p) (see gls_ml_se_note);
## this undoes that, giving the GLS SEs at the ML estimates
fx_gls_ml <- function(f) {
  x <- fx_gls(f); N <- nobs(f); p <- length(x$estimate)
  x$se <- x$se * sqrt((N - p) / N); x
}
fx_lmer <- function(f) { s <- summary(f)$coefficients; list(estimate = s[, "Estimate"], se = s[, "Std. Error"]) }
call_str <- function(f) paste(trimws(deparse(if (isS4(f)) f@call else f$call, width.cutoff = 500L)), collapse = " ")

## ================================================================== data
cat("== cases ->", OUT, "\n")

## --- Orthodont (read from tests/fixtures/reference/data/Orthodont.csv)
ortho <- existing_data(plain_df(nlme::Orthodont), "Orthodont", "nlme::Orthodont")
ortho_notes <- "Orthodont's Subject is an ordered factor in nlme; it was made an unordered factor with the same level order (only the order of ranef output depends on it). The CSV is tests/fixtures/reference/data/Orthodont.csv."

## --- longsim: 60 subjects x 6 visits, ~10% of the post-baseline rows dropped
make_longsim <- function(seed = 20240601) {
  set.seed(seed)
  nsub <- 60; nvis <- 6
  d <- expand.grid(visit = 1:nvis, sid = 1:nsub)
  d$subject <- sprintf("S%02d", d$sid)
  trt <- rep(c("ctl", "trt"), length.out = nsub)[sample(nsub)]
  d$trt <- trt[d$sid]
  ## visit 1 at time 0; later visits jittered by up to +-0.3 around visit - 1
  d$time <- round((d$visit - 1) + ifelse(d$visit == 1, 0, runif(nrow(d), -0.3, 0.3)), 3)
  x <- round(rnorm(nsub), 3)
  d$x <- x[d$sid]
  u0 <- rnorm(nsub, 0, 1.5); u1 <- rnorm(nsub, 0, 0.3)
  sdv <- c(1.0, 1.1, 1.2, 1.3, 1.45, 1.6); phi <- 0.5
  e <- numeric(nrow(d))
  for (s in 1:nsub) {
    z <- numeric(nvis); z[1] <- rnorm(1)
    for (k in 2:nvis) z[k] <- phi * z[k - 1] + sqrt(1 - phi^2) * rnorm(1)
    e[d$sid == s] <- z * sdv
  }
  d$y <- round(10 + 0.8 * d$time + 1.2 * (d$trt == "trt") + 0.3 * d$time * (d$trt == "trt") +
                 0.5 * d$x + u0[d$sid] + u1[d$sid] * d$time + e, 3)
  ## drop 10% of the rows at random, never visit 1 (baseline) and never subject 1
  ## (so that nlme's data-order-based level orders are 1..6)
  cand <- which(d$visit > 1 & d$sid > 1)
  drop <- sort(sample(cand, round(0.1 * nrow(d))))
  d <- d[-drop, c("subject", "trt", "x", "visit", "time", "y")]
  rownames(d) <- NULL
  d$subject <- factor(d$subject, levels = sprintf("S%02d", 1:nsub))
  d$trt <- factor(d$trt, levels = c("ctl", "trt"))
  d
}
LONG_SRC <- paste("simulated in make_structure_cases.R (set.seed(20240601)): 60 subjects x 6 visits;",
                  "y = 10 + 0.8 time + 1.2 trt + 0.3 time:trt + 0.5 x + u0 + u1 time + e with",
                  "u0 ~ N(0, 1.5^2), u1 ~ N(0, 0.3^2), e an AR(1) process over visits (phi 0.5) with",
                  "SD 1.0, 1.1, 1.2, 1.3, 1.45, 1.6 at visits 1..6; time = visit - 1 + U(-0.3, 0.3)",
                  "(0 at visit 1); 36 rows (10%) dropped at random among visits 2..6 of subjects",
                  "S02..S60.")
long <- export_data(make_longsim(), "longsim", LONG_SRC)
long_notes <- c("longsim: 'visit' is an integer 1..6 (position), 'time' the irregular continuous time. Visit 1 is never missing and subject S01 is complete, so nlme's data-order level orders (varIdent reference, corSymm positions) are visits 1..6.",
                "Fixed-effect names with factor(visit) are R's, e.g. 'factor(visit)2' and 'trttrt:factor(visit)2'.")

## --- condsim: 30 groups x 3 conditions x 4 replicates, 36 rows dropped
make_condsim <- function(seed = 20240602) {
  set.seed(seed)
  ng <- 30
  d <- expand.grid(rep = 1:4, cond = c("A", "B", "C"), gid = 1:ng, stringsAsFactors = FALSE)
  d$g <- sprintf("G%02d", d$gid)
  sds <- c(1, 1.5, 2)
  R <- matrix(0.5, 3, 3); diag(R) <- 1
  L <- t(chol(diag(sds) %*% R %*% diag(sds)))
  U <- t(L %*% matrix(rnorm(3 * ng), 3, ng))        # ng x 3
  d$x <- round(runif(nrow(d), -1, 1), 3)
  ci <- match(d$cond, c("A", "B", "C"))
  d$y <- round(5 + c(0, 1, 2)[ci] + 0.7 * d$x + U[cbind(d$gid, ci)] + rnorm(nrow(d)), 3)
  d <- d[-sort(sample(nrow(d), 36)), c("g", "cond", "x", "y")]
  rownames(d) <- NULL
  d$g <- factor(d$g, levels = sprintf("G%02d", 1:ng))
  d$cond <- factor(d$cond, levels = c("A", "B", "C"))
  d
}
COND_SRC <- paste("simulated in make_structure_cases.R (set.seed(20240602)): 30 groups g x 3 conditions",
                  "x 4 replicates; y = 5 + (0, 1, 2)[cond] + 0.7 x + u[g, cond] + N(0, 1) with",
                  "u[g, ] ~ N(0, heterogeneous CS: SD 1, 1.5, 2, correlation 0.5); 36 rows dropped at random.")
cond <- export_data(make_condsim(), "condsim", COND_SRC)

## ================================================================== nlme cases
D_PHI_AR1 <- c(Phi = "corAR1: correlation between positions i and j is Phi^|i - j|")
D_RHO <- c(Rho = "corCompSymm: common within-group correlation")
D_RATIO <- "varIdent: residual SD of this level divided by the SD of the reference level (first in data order, see varStruct_levels); variance ratio = ratio^2"

## --- Orthodont
nlme_case("orthodont_gls_varpower_reml",
          function(d) nlme::gls(distance ~ age * Sex, data = d,
                                weights = nlme::varPower(form = ~ age)),
          ortho, group = "Subject",
          notes = c(ortho_notes, "varPower(form = ~ age): Var(e_ij) = sigma^2 * |age_ij|^(2 * power), i.e. SD = sigma * |age|^power. No within-subject correlation: the marginal covariance is diagonal."),
          descr = c(power = "varPower: residual SD = sigma * |age|^power"),
          spec = list(fixed = "distance ~ age * Sex", random = NA, correlation = NA,
                      weights = "varPower(form = ~ age)"))
nlme_case("orthodont_gls_ar1_reml",
          function(d) nlme::gls(distance ~ age * Sex, data = d,
                                correlation = nlme::corAR1(form = ~ 1 | Subject)),
          ortho, group = "Subject",
          notes = c(ortho_notes, "corAR1(form = ~ 1 | Subject): positions are the row order within Subject (ages 8, 10, 12, 14)."),
          descr = D_PHI_AR1,
          spec = list(fixed = "distance ~ age * Sex", random = NA,
                      correlation = "corAR1(form = ~ 1 | Subject)", weights = NA))
nlme_case("orthodont_gls_ar1_ml",
          function(d) nlme::gls(distance ~ age * Sex, data = d, method = "ML",
                                correlation = nlme::corAR1(form = ~ 1 | Subject)),
          ortho, group = "Subject",
          notes = c(ortho_notes, "ML version of orthodont_gls_ar1_reml."),
          descr = D_PHI_AR1,
          spec = list(fixed = "distance ~ age * Sex", random = NA,
                      correlation = "corAR1(form = ~ 1 | Subject)", weights = NA))
nlme_case("orthodont_lme_varident_sex_reml",
          function(d) nlme::lme(distance ~ age * Sex, data = d, random = ~ 1 | Subject,
                                weights = nlme::varIdent(form = ~ 1 | Sex)),
          ortho, group = "Subject",
          notes = c(ortho_notes, "Random intercept per Subject plus residual SD that differs by Sex: SD = sigma for Male (the first Sex in data order), sigma * ratio:Female for Female. The random-intercept variance is common to both sexes.",
                    "modelStruct (nlme) holds reStruct as var/cov relative to sigma^2; random_effects and structure_parameters hold the absolute values."),
          descr = c("Subject:sd:(Intercept)" = "random-intercept SD (absolute)",
                    "ratio:Female" = D_RATIO),
          spec = list(fixed = "distance ~ age * Sex", random = "~ 1 | Subject", correlation = NA,
                      weights = "varIdent(form = ~ 1 | Sex)"))
nlme_case("orthodont_gls_cs_varident_sex_reml",
          function(d) nlme::gls(distance ~ age * Sex, data = d,
                                correlation = nlme::corCompSymm(form = ~ 1 | Subject),
                                weights = nlme::varIdent(form = ~ 1 | Sex)),
          ortho, group = "Subject",
          notes = c(ortho_notes, "Compound symmetry within Subject with a Sex-specific variance: Cov = sigma_s^2 * ((1 - Rho) I + Rho J), sigma_Male = sigma, sigma_Female = sigma * ratio:Female. The correlation Rho is common to both sexes (so the between-subject variance Rho * sigma_s^2 differs by sex, unlike orthodont_lme_varident_sex_reml)."),
          descr = c(D_RHO, "ratio:Female" = D_RATIO),
          spec = list(fixed = "distance ~ age * Sex", random = NA,
                      correlation = "corCompSymm(form = ~ 1 | Subject)",
                      weights = "varIdent(form = ~ 1 | Sex)"))

## --- longsim
D_CORSYMM <- "cor(i,j): corSymm correlation between visits i and j (positions = the value of visit, 1..6)"
nlme_case("longsim_gls_mmrm_reml",
          function(d) nlme::gls(y ~ trt * factor(visit), data = d,
                                correlation = nlme::corSymm(form = ~ visit | subject),
                                weights = nlme::varIdent(form = ~ 1 | visit)),
          long, group = "subject",
          notes = c(long_notes, "MMRM: unstructured 6x6 covariance per subject = corSymm (15 correlations) x varIdent (sigma at visit 1, ratios at visits 2..6). 'form = ~ visit | subject' makes the corSymm positions the visit number, so subjects with missing visits use the right sub-matrix (row order would be wrong).",
                    "cor_matrix_first_group and marginal_cov_first_group are for S01, which has all 6 visits."),
          descr = c("cor(i,j)" = D_CORSYMM, "ratio:<visit>" = D_RATIO),
          spec = list(fixed = "y ~ trt * factor(visit)", random = NA,
                      correlation = "corSymm(form = ~ visit | subject)",
                      weights = "varIdent(form = ~ 1 | visit)"))
nlme_case("longsim_gls_mmrm_ml",
          function(d) nlme::gls(y ~ trt * factor(visit), data = d, method = "ML",
                                correlation = nlme::corSymm(form = ~ visit | subject),
                                weights = nlme::varIdent(form = ~ 1 | visit)),
          long, group = "subject",
          notes = c(long_notes, "ML version of longsim_gls_mmrm_reml."),
          descr = c("cor(i,j)" = D_CORSYMM, "ratio:<visit>" = D_RATIO),
          spec = list(fixed = "y ~ trt * factor(visit)", random = NA,
                      correlation = "corSymm(form = ~ visit | subject)",
                      weights = "varIdent(form = ~ 1 | visit)"))
nlme_case("longsim_gls_car1_reml",
          function(d) nlme::gls(y ~ trt * time, data = d,
                                correlation = nlme::corCAR1(form = ~ time | subject)),
          long, group = "subject",
          notes = c(long_notes, "corCAR1(form = ~ time | subject): correlation Phi^|t_i - t_j| on the continuous (irregular) time."),
          descr = c(Phi = "corCAR1: correlation between times s and t is Phi^|s - t|"),
          spec = list(fixed = "y ~ trt * time", random = NA,
                      correlation = "corCAR1(form = ~ time | subject)", weights = NA))
nlme_case("longsim_lme_ar1_reml",
          function(d) nlme::lme(y ~ trt * time, data = d, random = ~ 1 | subject,
                                correlation = nlme::corAR1(form = ~ visit | subject)),
          long, group = "subject",
          notes = c(long_notes, "Random intercept plus AR(1) residuals; corAR1(form = ~ visit | subject) uses the visit number as position, so a missing visit is a gap (lag 2 across it), not a shift.",
                    "Marginal covariance: sd_int^2 J + sigma^2 Phi^|v_i - v_j|.",
                    "nlme replaces corAR1 by corARMA(p = 1) when some group has gaps in its positions (missing visits), so modelStruct/corStruct name the parameter 'Phi1'; structure_parameters call it 'Phi'."),
          descr = c("subject:sd:(Intercept)" = "random-intercept SD", D_PHI_AR1),
          spec = list(fixed = "y ~ trt * time", random = "~ 1 | subject",
                      correlation = "corAR1(form = ~ visit | subject)", weights = NA))
## nlme fits that are the same marginal models as glmmTMB fits below
nlme_case("longsim_gls_ar1_visit_reml",
          function(d) nlme::gls(y ~ trt * time, data = d,
                                correlation = nlme::corAR1(form = ~ visit | subject)),
          long, group = "subject",
          notes = c(long_notes, "Same marginal model as longsim_tmb_ar1_nodisp_reml (glmmTMB ar1 with dispformula = ~ 0).",
                    "nlme replaces corAR1 by corARMA(p = 1) when some group has gaps in its positions (missing visits), so modelStruct/corStruct name the parameter 'Phi1'; structure_parameters call it 'Phi'. The model is the same AR(1) on the visit number."),
          descr = D_PHI_AR1,
          spec = list(fixed = "y ~ trt * time", random = NA,
                      correlation = "corAR1(form = ~ visit | subject)", weights = NA))
nlme_case("longsim_gls_exp_nugget_reml",
          function(d) nlme::gls(y ~ trt * time, data = d,
                                correlation = nlme::corExp(form = ~ visit | subject, nugget = TRUE)),
          long, group = "subject",
          notes = c(long_notes, "corExp with nugget on visit: Cov_ij = sigma^2 * (1 - nugget) * exp(-|v_i - v_j| / range) for i != j, sigma^2 on the diagonal. This is AR(1) + white noise: sd_ar^2 = sigma^2 (1 - nugget), Phi = exp(-1 / range), residual variance sigma^2 * nugget; the same marginal model as longsim_tmb_ar1_reml."),
          descr = c(range = "corExp: correlation (1 - nugget) exp(-d / range) at distance d > 0",
                    nugget = "corExp: nugget effect (share of sigma^2 that is white noise)"),
          spec = list(fixed = "y ~ trt * time", random = NA,
                      correlation = "corExp(form = ~ visit | subject, nugget = TRUE)", weights = NA))
nlme_case("longsim_gls_cs_varident_visit_reml",
          function(d) nlme::gls(y ~ trt * time, data = d,
                                correlation = nlme::corCompSymm(form = ~ 1 | subject),
                                weights = nlme::varIdent(form = ~ 1 | visit)),
          long, group = "subject",
          notes = c(long_notes, "Heterogeneous compound symmetry over visits: Cov_ij = Rho * s_i * s_j (i != j), s_i^2 on the diagonal, s_v = sigma * ratio:v. Same marginal model as longsim_tmb_cs_nodisp_reml (glmmTMB cs with dispformula = ~ 0)."),
          descr = c(D_RHO, "ratio:<visit>" = D_RATIO),
          spec = list(fixed = "y ~ trt * time", random = NA,
                      correlation = "corCompSymm(form = ~ 1 | subject)",
                      weights = "varIdent(form = ~ 1 | visit)"))

## ================================================================== glmmTMB cases
TMB_COMMON <- c("glmmTMB REML = TRUE integrates the fixed effects out (Laplace, exact for Gaussian); its REML log-likelihood equals lme4's and nlme's REML log-likelihood for the same model (see crosscheck).",
                "fixed.se / fixed.z / fixed.p are glmmTMB's summary() Wald z table (no denominator df).",
                "sigma is sigma(m), the residual SD; betad is log(sigma^2) (glmmTMB's dispersion model, log link).",
                "glmmTMB's fixed-effect SEs are NOT exactly the GLS ones sqrt(diag((X' V^-1 X)^-1)) that lme4 and nlme (REML) report: with REML = TRUE the fixed effects are random effects of the TMB model and sdreport() adds the uncertainty of the variance parameters (SEs larger by ~1e-5 to 1e-3 relative here; inverting the (beta, b) block of the joint precision gives the GLS SEs exactly); with REML = FALSE they come from the inverse observed Hessian over (beta, theta), whose beta-theta cross terms are not zero (~1e-4 relative here). See crosscheck.se_max_rel_diff.")
D_TMB_SD <- "random-effect SD of the term (absolute scale)"

## ar1 + residual (identifiable: AR(1) random process plus white noise)
tmb_case("longsim_tmb_ar1_reml", y ~ trt * time + ar1(0 + factor(visit) | subject), long,
         group = "subject",
         notes = c(long_notes, TMB_COMMON,
                   "ar1(0 + factor(visit) | subject): one latent AR(1) process per subject over the levels of factor(visit), which glmmTMB treats as unit-spaced consecutive positions in level order (the level values are not used). Homogeneous variance: one SD for all visits (subject:sd) and one correlation (subject:Phi); Cov(u_i, u_j) = sd^2 Phi^|i - j|.",
                   "Missing visits are fine (the latent u at a missing visit is simply unobserved) as long as every level 1..6 occurs somewhere in the data; a level absent from the whole data set would be dropped and would silently shorten the lags.",
                   "With the default dispformula (~ 1) the model is AR(1) + white noise and is identifiable (lag-k covariances sd^2 Phi^k, variance sd^2 + sigma^2). Marginally it equals gls corExp(form = ~ visit | subject, nugget = TRUE): see crosscheck."),
         descr = c("subject:sd" = "ar1: common SD of the latent AR(1) process",
                   "subject:Phi" = "ar1: lag-1 correlation; correlation at lag k is Phi^k"),
         crosscheck = function(d, m) {
           f <- nlme::gls(y ~ trt * time, data = d,
                          correlation = nlme::corExp(form = ~ visit | subject, nugget = TRUE))
           vc <- VarCorr(m)$cond$subject
           sd_ar <- attr(vc, "stddev")[1]; phi <- attr(vc, "correlation")[2, 1]
           tot <- sd_ar^2 + sigma(m)^2
           cs <- coef(f$modelStruct$corStruct, unconstrained = FALSE)
           list(engine = "nlme::gls", call = call_str(f), logLik = as.numeric(logLik(f)),
                fixed = fx_gls(f),
                relation = "gls sigma^2 = sd^2 + sigma_tmb^2; nugget = sigma_tmb^2 / (sd^2 + sigma_tmb^2); range = -1 / log(Phi)",
                mapped = list(total_sd = c(sqrt(tot), f$sigma),
                              nugget = c(sigma(m)^2 / tot, cs[["nugget"]]),
                              range = c(-1 / log(phi), cs[["range"]])))
         })
tmb_case("longsim_tmb_ar1_ml", y ~ trt * time + ar1(0 + factor(visit) | subject), long,
         group = "subject", REML = FALSE,
         notes = c(long_notes, TMB_COMMON, "ML version of longsim_tmb_ar1_reml."),
         descr = c("subject:sd" = "ar1: common SD of the latent AR(1) process",
                   "subject:Phi" = "ar1: lag-1 correlation; correlation at lag k is Phi^k"),
         crosscheck = function(d, m) {
           f <- nlme::gls(y ~ trt * time, data = d, method = "ML",
                          correlation = nlme::corExp(form = ~ visit | subject, nugget = TRUE))
           list(engine = "nlme::gls", call = call_str(f), logLik = as.numeric(logLik(f)),
                fixed = fx_gls_ml(f),
                relation = "same marginal model (see longsim_tmb_ar1_reml); the gls SEs are compared after multiplying by sqrt((N - p) / N), which undoes nlme's ML scaling")
         })
## ar1 without residual: pure AR(1) marginal covariance
tmb_case("longsim_tmb_ar1_nodisp_reml", y ~ trt * time + ar1(0 + factor(visit) | subject), long,
         group = "subject", dispformula = ~ 0,
         notes = c(long_notes, TMB_COMMON,
                   "dispformula = ~ 0 fixes the residual variance at a tiny value: betad = log(sqrt(.Machine$double.eps)), so sigma(m)^2 = 2^-26 ~ 1.5e-8 and sigma(m) = 2^-13 ~ 1.2e-4 (?glmmTMB mentions glmmTMBControl(zero_dispval = ...), but glmmTMBControl() of 1.1.5 has no such argument); the marginal covariance is then the AR(1) matrix sd^2 Phi^|i - j| alone, the same model as gls corAR1(form = ~ visit | subject) with sigma = sd (crosscheck).",
                   "marginal_cov_first_group includes the tiny sigma(m)^2 on the diagonal."),
         descr = c("subject:sd" = "ar1: common SD of the latent AR(1) process",
                   "subject:Phi" = "ar1: lag-1 correlation; correlation at lag k is Phi^k"),
         crosscheck = function(d, m) {
           f <- nlme::gls(y ~ trt * time, data = d,
                          correlation = nlme::corAR1(form = ~ visit | subject))
           vc <- VarCorr(m)$cond$subject
           list(engine = "nlme::gls", call = call_str(f), logLik = as.numeric(logLik(f)),
                fixed = fx_gls(f), relation = "gls sigma = sd; gls Phi = Phi",
                mapped = list(sd = c(attr(vc, "stddev")[1], f$sigma),
                              Phi = c(attr(vc, "correlation")[2, 1],
                                      coef(f$modelStruct$corStruct, unconstrained = FALSE)[[1]])))
         })
## cs over visits: heterogeneous CS; with a residual it is nearly unidentified
tmb_case("longsim_tmb_cs_nodisp_reml", y ~ trt * time + cs(0 + factor(visit) | subject), long,
         group = "subject", dispformula = ~ 0,
         notes = c(long_notes, TMB_COMMON,
                   "cs in glmmTMB 1.1.5 is HETEROGENEOUS compound symmetry: one SD per term (6 here) and one common correlation Rho; Cov(u_i, u_j) = Rho sd_i sd_j. Internally Rho = plogis(theta) * (1 + a) - a with a = 1 / (n - 1), so Rho > -1/(n-1).",
                   "R's fit ends with nlminb 'false convergence (8)' (log.warnings, convergence.code = 1; pdHess is TRUE). The optimum is limited by the tiny fixed residual variance: the log-likelihood agrees with the gls twin longsim_gls_cs_varident_visit_reml to ~6e-7 and the SDs and Rho to ~1e-4 relative (restarting nlminb or using optim/BFGS does not do better). Use the gls twin as the precise reference for this model.",
                   "With one observation per subject and visit, cs(0 + factor(visit) | subject) plus a residual is only weakly identified (the residual variance trades off against the 6 diagonal variances; it is identified only through the heterogeneity of the variances). On these data that fit gives nlminb 'false convergence' with Rho -> 1, so this case uses dispformula = ~ 0: the marginal covariance is heterogeneous CS, the same model as gls corCompSymm(~ 1 | subject) + varIdent(~ 1 | visit) (crosscheck)."),
         descr = c("subject:sd:factor(visit)<v>" = "cs: SD of the random effect at visit v",
                   "subject:Rho" = "cs: common correlation"),
         crosscheck = function(d, m) {
           f <- nlme::gls(y ~ trt * time, data = d,
                          correlation = nlme::corCompSymm(form = ~ 1 | subject),
                          weights = nlme::varIdent(form = ~ 1 | visit))
           vc <- VarCorr(m)$cond$subject
           sds <- attr(vc, "stddev")
           gsd <- f$sigma * c(1, coef(f$modelStruct$varStruct, unconstrained = FALSE))
           out <- list(Rho = c(attr(vc, "correlation")[2, 1],
                               coef(f$modelStruct$corStruct, unconstrained = FALSE)[[1]]))
           for (k in seq_along(sds)) out[[paste0("sd:visit", k)]] <- c(sds[[k]], gsd[[k]])
           list(engine = "nlme::gls", call = call_str(f), logLik = as.numeric(logLik(f)),
                fixed = fx_gls(f), relation = "gls sigma * ratio:v = sd_v; gls Rho = Rho",
                mapped = out)
         })
## us / diag on (1 + time | subject)
tmb_case("longsim_tmb_us_reml", y ~ trt * time + us(1 + time | subject), long,
         group = "subject",
         notes = c(long_notes, TMB_COMMON,
                   "us is the unstructured covariance (the default for (1 + time | subject)); internal theta = (log SD_1, log SD_2, Cholesky-of-correlation element), rho = theta_3 / sqrt(1 + theta_3^2). Same model as lme4 (1 + time | subject) (crosscheck).",
                   "For a 2x2 term cs(1 + time | subject) is the same model as us(1 + time | subject) (heterogeneous CS with n = 2 has 2 SDs + 1 correlation); its logLik is in notes_cs_equivalent."),
         descr = c("subject:sd:<term>" = D_TMB_SD,
                   "subject:cor((Intercept),time)" = "us: intercept-slope correlation"),
         crosscheck = function(d, m) {
           f <- lme4::lmer(y ~ trt * time + (1 + time | subject), data = d, REML = TRUE)
           vc <- as.data.frame(lme4::VarCorr(f))
           tv <- VarCorr(m)$cond$subject
           list(engine = "lme4::lmer", call = call_str(f), logLik = as.numeric(logLik(f)),
                fixed = fx_lmer(f), relation = "identical model",
                mapped = list(`sd:(Intercept)` = c(attr(tv, "stddev")[[1]], vc$sdcor[1]),
                              `sd:time` = c(attr(tv, "stddev")[[2]], vc$sdcor[2]),
                              `cor((Intercept),time)` = c(attr(tv, "correlation")[1, 2], vc$sdcor[3]),
                              sigma = c(sigma(m), vc$sdcor[4])))
         })
tmb_case("longsim_tmb_us_ml", y ~ trt * time + us(1 + time | subject), long,
         group = "subject", REML = FALSE,
         notes = c(long_notes, TMB_COMMON, "ML version of longsim_tmb_us_reml."),
         descr = c("subject:sd:<term>" = D_TMB_SD,
                   "subject:cor((Intercept),time)" = "us: intercept-slope correlation"),
         crosscheck = function(d, m) {
           f <- lme4::lmer(y ~ trt * time + (1 + time | subject), data = d, REML = FALSE)
           list(engine = "lme4::lmer", call = call_str(f), logLik = as.numeric(logLik(f)),
                fixed = fx_lmer(f), relation = "identical model (ML)")
         })
tmb_case("longsim_tmb_diag_reml", y ~ trt * time + diag(1 + time | subject), long,
         group = "subject",
         notes = c(long_notes, TMB_COMMON,
                   "diag is a diagonal covariance with one SD per term (heterogeneous); same model as lme4 (1 + time || subject) (crosscheck)."),
         descr = c("subject:sd:<term>" = D_TMB_SD),
         crosscheck = function(d, m) {
           f <- lme4::lmer(y ~ trt * time + (1 + time || subject), data = d, REML = TRUE)
           list(engine = "lme4::lmer", call = call_str(f), logLik = as.numeric(logLik(f)),
                fixed = fx_lmer(f), relation = "identical model")
         })
## cs over a 3-level within-group factor with replicates: identifiable with a residual
tmb_case("condsim_tmb_cs_reml", y ~ cond + x + cs(0 + cond | g), cond,
         group = "g",
         notes = c(TMB_COMMON,
                   "cs(0 + cond | g): heterogeneous compound symmetry of the 3 condition effects per group (SDs g:sd:condA..C, one correlation g:Rho). Each g x cond cell has replicates, so the residual is identified.",
                   "condsim: cond is a factor with levels A, B, C; g has 30 levels."),
         descr = c("g:sd:cond<k>" = "cs: SD of the random effect of condition k",
                   "g:Rho" = "cs: common correlation"),
         crosscheck = function(d, m) {
           f <- glmmTMB::glmmTMB(y ~ cond + x + us(0 + cond | g), data = d, REML = TRUE)
           list(engine = "glmmTMB::glmmTMB", call = call_str(f), logLik = as.numeric(logLik(f)),
                fixed = list(estimate = fixef(f)$cond, se = sqrt(diag(vcov(f)$cond))),
                relation = "NOT the same model: us(0 + cond | g), the unstructured 3x3 that contains cs (logLik_diff <= 0 is the likelihood-ratio statistic / -2)")
         })
tmb_case("condsim_tmb_cs_ml", y ~ cond + x + cs(0 + cond | g), cond,
         group = "g", REML = FALSE,
         notes = c(TMB_COMMON, "ML version of condsim_tmb_cs_reml."),
         descr = c("g:sd:cond<k>" = "cs: SD of the random effect of condition k",
                   "g:Rho" = "cs: common correlation"))
## homogeneous CS: glmmTMB 1.1.5 has no homcs keyword; tie the SDs with map
tmb_case("condsim_tmb_homcs_map_reml", y ~ cond + x + cs(0 + cond | g), cond,
         group = "g", map = list(theta = factor(c(1, 1, 1, 2))),
         notes = c(TMB_COMMON,
                   "Homogeneous compound symmetry. glmmTMB 1.1.5 has no 'homcs' keyword, so cs(0 + cond | g) is fitted with map = list(theta = factor(c(1, 1, 1, 2))), which ties the three log-SDs to one parameter. Same model as nlme::lme(random = list(g = pdCompSymm(~ 0 + cond))) (crosscheck); logLik_df counts the tied parameter once."),
         descr = c("g:sd:cond<k>" = "cs: SD of the random effect of condition k (all equal here)",
                   "g:Rho" = "cs: common correlation"),
         crosscheck = function(d, m) {
           f <- nlme::lme(y ~ cond + x, data = d, random = list(g = nlme::pdCompSymm(~ 0 + cond)))
           vc <- VarCorr(m)$cond$g
           pd <- as.matrix(f$modelStruct$reStruct$g) * f$sigma^2
           list(engine = "nlme::lme", call = call_str(f), logLik = as.numeric(logLik(f)),
                fixed = fx_gls(f), relation = "identical model",
                mapped = list(sd = c(attr(vc, "stddev")[[1]], sqrt(pd[1, 1])),
                              Rho = c(attr(vc, "correlation")[2, 1], pd[1, 2] / pd[1, 1]),
                              sigma = c(sigma(m), f$sigma)))
         })

## --- extra check recorded in longsim_tmb_us_reml: cs == us for a 2x2 term
local({
  m_cs <- suppressWarnings(glmmTMB::glmmTMB(y ~ trt * time + cs(1 + time | subject),
                                            data = long$data, REML = TRUE))
  id <- "longsim_tmb_us_reml"
  obj <- CASES[[id]]
  obj$notes_cs_equivalent <- list(
    call = "glmmTMB(y ~ trt * time + cs(1 + time | subject), data = d, REML = TRUE)",
    logLik = as.numeric(logLik(m_cs)),
    logLik_diff_vs_us = as.numeric(logLik(m_cs)) - obj$logLik,
    cor = attr(VarCorr(m_cs)$cond$subject, "correlation")[1, 2])
  write_case(obj, id)
})

## ================================================================== keyword table
kw <- names(COVSTRUCT)
probe <- function(k) {
  f <- as.formula(sprintf("y ~ cond + x + %s(0 + cond | g)", k))
  r <- tryCatch({ glmmTMB::glmmTMB(f, data = cond$data, doFit = FALSE); "accepted" },
                error = function(e) paste("error:", conditionMessage(e)))
  r
}
kw_info <- list(
  glmmTMB_version = as.character(utils::packageVersion("glmmTMB")),
  valid_covstruct = as.list(COVSTRUCT),
  probe_not_in_this_version = lapply(setNames(nm = c("homcs", "hetar1", "homdiag", "hetcs",
                                                     "homar1", "homtoep")), probe),
  meaning = list(
    diag = "diagonal, heterogeneous: theta = log SD per term",
    us = "unstructured (default for (a + b | g)): theta = (log SD_1..n, strict lower triangle of the Cholesky factor L of the correlation, row-major); C = D^-1/2 L L' D^-1/2, D = diag(L L')",
    cs = "HETEROGENEOUS compound symmetry: theta = (log SD_1..n, t); Rho = plogis(t) * (1 + a) - a, a = 1/(n-1)",
    ar1 = "AR(1), HOMOGENEOUS variance: theta = (log SD, t); Phi = t / sqrt(1 + t^2); positions = factor levels, unit-spaced",
    ou = "Ornstein-Uhlenbeck (continuous-time AR(1)), homogeneous: theta = (log SD, t); cor = exp(-exp(t) * |t_i - t_j|); needs numFactor() coordinates; experimental",
    exp = "spatial exponential correlation, needs numFactor() coordinates; experimental",
    gau = "spatial Gaussian correlation, needs numFactor() coordinates; experimental",
    mat = "Matern correlation, needs numFactor() coordinates; experimental",
    toep = "heterogeneous Toeplitz: theta = (log SD_1..n, t_1..t_{n-1}); cor at lag k = t_k / sqrt(1 + t_k^2); experimental",
    rr = "reduced rank / factor analytic, rr(terms | g, d)"),
  source = "glmmTMB:::.valid_covstruct, ?glmmTMB (Details), vignette('covstruct'), the TMB template src/glmmTMB.cpp (termwise_nll), and the probes above. The theta transforms of diag, us (2x2 and 4x4), cs, ar1 and toep were checked against VarCorr() of glmmTMB 1.1.5 (the cases' theta_to_natural_max_abs_diff does this for every case); those of ou, exp, gau, mat were not.",
  generator = GENERATOR)
jsonlite::write_json(kw_info, file.path(OUT, "glmmtmb_covstructs.json"), digits = NA,
                     auto_unbox = TRUE, na = "null", pretty = TRUE)
cat("  -> glmmtmb_covstructs.json\n")

## ================================================================== summary
cat("\n== summary\n")
for (id in sort(ls(CASES))) {
  o <- CASES[[id]]
  cat(sprintf("%-38s %-18s logLik %.6f  warnings %d errors %d\n", id, o$engine,
              if (is.null(o$logLik)) NA else o$logLik,
              length(o$log$warnings), length(o$log$errors)))
}
cat("done\n")
