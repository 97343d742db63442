"""The paper's claims as measured verdicts.

Each verdict names the metric it reads (one number per seed, computed by the
experiment from the probes), how the seeds are aggregated, and a fixed rule.
The thresholds below were set from the wording of the claims before any run
was looked at and are not tuned: if a claim does not reproduce, it says FAIL.

    C1  MRP captures all features shown to it       min over seeds of captured share == 1
    C2  each MRP kernel captures at most one        max over seeds of features per kernel <= 1
    C3a SL captures about one feature per class      mean share of classes with exactly one >= 0.8
    C3b SL's winner is the lottery ticket            mean share predicted by init >= (1 + 1/L) / 2
    C4a MRP+FT multi-view test error near 0          mean <= 0.05
    C4b MRP+FT single-view test error near 0         mean <= 0.05
    C5a SL single-view test error about 1 - 1/L      |mean - (1 - 1/L)| <= 0.15   (1/2 for L = 2)
    C5b SL overall test error about mu (1 - 1/L)     |mean - mu (1 - 1/L)| <= 0.10 (mu/2 for L = 2)
    C6  MRP+FT beats SL on single-view data          min over seeds of the error gap >= 0.05
    C7  fine-tuning keeps MRP's features             min over seeds of the retained share == 1

"Chance" for the lottery is 1/L; (1 + 1/L)/2 is halfway from chance to
certainty. C6's 0.05 margin is ~3 standard errors of an error rate measured on
1,000 single-view test samples, so a pass is not sampling noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Claim:
    id: str
    statement: str
    metric: str
    agg: Literal["min", "max", "mean"]
    op: Literal[">=", "<=", "within"]
    threshold: float
    target: float | None = None  # for "within": |agg - target| <= threshold

    def rule(self) -> str:
        if self.op == "within":
            return f"|{self.agg} - {self.target:.3g}| <= {self.threshold:.3g}"
        return f"{self.agg} {self.op} {self.threshold:.3g}"


def claims_for(L: int, mu_test: float) -> list[Claim]:
    sv_err = 1.0 - 1.0 / L
    return [
        Claim("C1", "MRP captures all features its pretraining data shows", "mrp_captured_share", "min", ">=", 1.0),
        Claim("C2", "each MRP kernel captures at most one feature", "mrp_max_features_per_kernel", "max", "<=", 1.0),
        Claim("C3a", "SL captures about one feature per class", "sl_share_classes_one_feature", "mean", ">=", 0.8),
        Claim("C3b", "SL's winning feature is the one with the larger initial correlation", "sl_lottery_hit_rate",
              "mean", ">=", (1.0 + 1.0 / L) / 2),
        Claim("C4a", "MRP+FT test error near 0 on multi-view data", "ft_err_multi", "mean", "<=", 0.05),
        Claim("C4b", "MRP+FT test error near 0 on single-view data", "ft_err_single", "mean", "<=", 0.05),
        Claim("C5a", f"SL single-view test error about {sv_err:.2f}", "sl_err_single", "mean", "within", 0.15, sv_err),
        Claim("C5b", f"SL overall test error about mu*(1-1/L) = {mu_test * sv_err:.3f}", "sl_err", "mean", "within",
              0.10, mu_test * sv_err),
        Claim("C6", "MRP+FT beats SL on single-view test data", "single_view_gap", "min", ">=", 0.05),
        Claim("C7", "fine-tuning keeps the features MRP captured", "ft_retained_share", "min", ">=", 1.0),
    ]


def _stats(values: list[float]) -> dict[str, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan}
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(vals), "max": max(vals)}


# Rates are ratios of counts (e.g. 650/1000); compare with a tolerance far below
# one count so that float rounding never flips a verdict at an exact boundary.
_EPS = 1e-9


def verdict(claim: Claim, per_seed: list[float]) -> dict:
    stats = _stats(per_seed)
    value = stats[claim.agg]
    if math.isnan(value) or any(math.isnan(v) for v in per_seed):
        passed = False  # a seed that could not be measured fails the claim; it is never dropped
    elif claim.op == ">=":
        passed = value >= claim.threshold - _EPS
    elif claim.op == "<=":
        passed = value <= claim.threshold + _EPS
    else:
        passed = abs(value - float(claim.target)) <= claim.threshold + _EPS
    return {
        "id": claim.id,
        "statement": claim.statement,
        "metric": claim.metric,
        "rule": claim.rule(),
        "threshold": claim.threshold,
        "target": claim.target,
        "per_seed": per_seed,
        **stats,
        "value": value,
        "verdict": "PASS" if passed else "FAIL",
    }


def evaluate(per_seed_metrics: list[dict[str, float]], L: int, mu_test: float) -> list[dict]:
    """Verdicts for every claim from per-seed metric dicts."""
    return [verdict(c, [float(m[c.metric]) for m in per_seed_metrics]) for c in claims_for(L, mu_test)]
