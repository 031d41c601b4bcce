# Reference values for predict(se_fit=, interval=) and simulate(re_form=) in lmmjax.
# Population-level SEs and intervals: emmeans on a reference grid (Satterthwaite and KR df).
# Conditional prediction-error variances: Henderson's mixed-model equations formed densely
# from lme4's own X, Z, Lambda (getME) at the fitted theta.
#   Rscript tests/r/make_predict_cases.R  ->  tests/fixtures/predict/predict.json
suppressPackageStartupMessages({library(lme4); library(lmerTest); library(emmeans); library(jsonlite)})
ctrl <- lmerControl(optimizer = "bobyqa", optCtrl = list(rhoend = 1e-12, rhobeg = 1e-3, maxfun = 1e5))
out <- list()

pev <- function(m, Xn, Zn) {
  X <- getME(m, "X"); Z <- as.matrix(getME(m, "Z")); L <- as.matrix(t(getME(m, "Lambdat")))
  q <- ncol(Z)
  A <- rbind(cbind(t(L) %*% crossprod(Z) %*% L + diag(q), t(L) %*% crossprod(Z, X)),
             cbind(crossprod(X, Z) %*% L, crossprod(X)))
  G <- cbind(Zn %*% L, Xn)
  sigma(m)^2 * rowSums((G %*% solve(A)) * G)
}

# ---- sleepstudy, (Days | Subject)
m <- lmer(Reaction ~ Days + (Days | Subject), sleepstudy, control = ctrl)
days <- c(0, 4.5, 9)
e_s <- as.data.frame(emmeans(m, ~ Days, at = list(Days = days), lmer.df = "satterthwaite"))
e_k <- as.data.frame(emmeans(m, ~ Days, at = list(Days = days), lmer.df = "kenward-roger"))
Z <- as.matrix(getME(m, "Z")); X <- getME(m, "X")
rows <- c(1, 2, 11, 57, 180)
nd <- data.frame(Days = c(4.5, 0, 9), Subject = factor(c("308", "335", "372"), levels = levels(sleepstudy$Subject)))
Zn <- matrix(0, nrow(nd), ncol(Z)); colnames(Zn) <- colnames(Z)
for (i in seq_len(nrow(nd))) {
  j <- match(as.character(nd$Subject[i]), levels(sleepstudy$Subject))
  Zn[i, 2 * j - 1] <- 1; Zn[i, 2 * j] <- nd$Days[i]
}
Xn <- cbind(1, nd$Days)
S <- VarCorr(m)$Subject
newsubj <- data.frame(Days = days)
Xp <- cbind(1, days)
pop_pred_var <- rowSums((Xp %*% vcov(m)) * Xp) + rowSums((Xp %*% S) * Xp) + sigma(m)^2
out$sleepstudy <- list(
  theta = getME(m, "theta"),
  grid = days, emm_satt = e_s, emm_kr = e_k,
  rows = rows, fit_rows = unname(fitted(m)[rows]), pev_rows = pev(m, X[rows, , drop = FALSE], Z[rows, , drop = FALSE]),
  newdata = nd, fit_new = unname(predict(m, nd)), pev_new = pev(m, Xn, Zn),
  pop_pred_var = pop_pred_var, sigma = sigma(m))

# ---- Penicillin, crossed (1 | plate) + (1 | sample): conditional on plate only for the new rows
m2 <- lmer(diameter ~ 1 + (1 | plate) + (1 | sample), Penicillin, control = ctrl)
Z2 <- as.matrix(getME(m2, "Z")); X2 <- getME(m2, "X")
rows2 <- c(1, 7, 30, 144)
# re.form = ~(1 | plate): zero the sample columns
Zp <- Z2[rows2, , drop = FALSE]; Zp[, grepl("^[A-F]$", colnames(Zp))] <- 0
out$penicillin <- list(
  theta = getME(m2, "theta"), rows = rows2,
  fit_rows = unname(fitted(m2)[rows2]), pev_rows = pev(m2, X2[rows2, , drop = FALSE], Z2[rows2, , drop = FALSE]),
  fit_plate = unname(predict(m2, re.form = ~ (1 | plate))[rows2]), pev_plate = pev(m2, X2[rows2, , drop = FALSE], Zp),
  var_sample = VarCorr(m2)$sample[1, 1], sigma = sigma(m2))
write_json(out, "tests/fixtures/predict/predict.json", digits = NA, auto_unbox = TRUE)
