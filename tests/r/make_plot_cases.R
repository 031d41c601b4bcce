#!/usr/bin/env Rscript
## Coordinates of lme4's / base R's diagnostic plots, for tests/test_plots.py.
## Usage (repo root): Rscript tests/r/make_plot_cases.R
## Writes tests/fixtures/plots/plot_cases.json: per case the fitted values, the scaled
## Pearson residuals residuals(fit, "pearson", scaled = TRUE) (what plot.merMod and the
## QQ plot show), qqnorm's theoretical quantiles and qqline's intercept/slope, and per
## grouping factor the conditional modes with their conditional SDs (ranef(condVar = TRUE)),
## dotplot.ranef.mer's level order and qqmath.ranef.mer's normal quantiles.
suppressPackageStartupMessages({ library(lme4); library(jsonlite) })
ctrl <- lmerControl(optimizer = "bobyqa", optCtrl = list(rhoend = 1e-12, maxfun = 1e6))
sleep_w <- sleepstudy
sleep_w$w <- 1 + (sleep_w$Days %% 3) / 2
cases <- list(
  sleepstudy = list(formula = "Reaction ~ Days + (Days | Subject)", data = sleepstudy, weights = NULL),
  sleepstudy_weighted = list(formula = "Reaction ~ Days + (Days | Subject)", data = sleep_w,
                             weights = "w", weights_rule = "1 + (Days %% 3) / 2"),
  penicillin = list(formula = "diameter ~ 1 + (1 | plate) + (1 | sample)", data = Penicillin,
                    weights = NULL)
)
qq_line <- function(y) {   # stats::qqline's line through the quartiles (type 7)
  yq <- quantile(y, c(0.25, 0.75), names = FALSE, type = 7)
  xq <- qnorm(c(0.25, 0.75))
  slope <- diff(yq) / diff(xq)
  c(intercept = yq[1] - slope * xq[1], slope = slope)
}
out <- list()
for (nm in names(cases)) {
  cs <- cases[[nm]]
  dat <- cs$data
  fit <- if (is.null(cs$weights)) lmer(as.formula(cs$formula), data = dat, REML = TRUE, control = ctrl)
         else lmer(as.formula(cs$formula), data = dat, REML = TRUE, control = ctrl, weights = dat[[cs$weights]])
  rs <- unname(residuals(fit, type = "pearson", scaled = TRUE))
  qq <- qqnorm(rs, plot.it = FALSE)
  ln <- qq_line(rs)
  re <- ranef(fit, condVar = TRUE)
  groups <- list()
  for (g in names(re)) {
    xt <- re[[g]]
    pv <- attr(xt, "postVar")
    se <- sapply(seq_len(ncol(xt)), function(i) sqrt(pv[i, i, ]))
    se <- matrix(se, nrow = nrow(xt))
    nr <- nrow(xt)
    cols <- list()
    for (j in seq_len(ncol(xt))) {
      v <- xt[[j]]
      cols[[colnames(xt)[j]]] <- list(
        values = unname(v), se = unname(se[, j]),
        ## qqmath.ranef.mer: sorted values against qnorm((1:n - 0.5) / n)
        qq_sorted = unname(sort(v)), qq_quantiles = qnorm((seq_len(nr) - 0.5) / nr))
    }
    groups[[g]] <- list(levels = rownames(xt), columns = cols,
                        ## dotplot.ranef.mer: levels ordered by the first column
                        dotplot_order = levels(reorder(factor(rownames(xt)), xt[[1]], FUN = mean)))
  }
  out[[nm]] <- list(formula = cs$formula, weights_rule = cs$weights_rule, sigma = sigma(fit),
                    fitted = unname(fitted(fit)), scaled_pearson = rs,
                    qqnorm_x = unname(qq$x), qqline = unname(as.list(ln)), ranef = groups)
}
out$control <- "bobyqa rhoend=1e-12"
out$lme4_version <- as.character(packageVersion("lme4"))
write_json(out, "tests/fixtures/plots/plot_cases.json", digits = NA, pretty = TRUE, auto_unbox = TRUE)
cat("wrote tests/fixtures/plots/plot_cases.json\n")
