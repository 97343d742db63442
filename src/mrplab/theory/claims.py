"""The paper's claims as measured verdicts.

Each verdict names the metric it reads (one number per seed, computed by the
experiment from the probes), how the seeds are aggregated, and a fixed rule.
The thresholds below were set from the wording of the claims before any run
was looked at and are not tuned: if a claim does not reproduce, it says FAIL.

    C1  MRP captures all features shown to it       min over seeds of captured share == 1
    C2  each capturing MRP kernel holds at most one  max over seeds of features per capturing kernel <= 1
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

Not every row is an independent test, and the report says so (``kind``):
C5b is *derived*: the overall error is mu x single-view error + (1 - mu) x
multi-view error, so with near-zero multi-view error it re-reads C5a's number
with a looser band. C7 is a *consistency* check: fine-tuning at a small
encoder lr cannot move a kernel far, so it checks the pipeline more than the
theory. Only kind "claim" rows count in "n of m claims PASS".

A verdict is N/A, never PASS, when there is nothing to judge: C2 when MRP
captured fewer than half of the features it was shown in some seed (the
maximum over no capturing kernels is vacuous), and every claim that reads an
MRP encoder when MRP collapsed in some seed (``mrp_collapsed``: its outputs
shrank to a tenth of their spread at init or onto one direction).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from mrplab.stats import describe


@dataclass(frozen=True)
class Claim:
    id: str
    statement: str
    metric: str
    agg: Literal["min", "max", "mean"]
    op: Literal[">=", "<=", "within"]
    threshold: float
    target: float | None = None  # for "within": |agg - target| <= threshold
    kind: Literal["claim", "derived", "consistency"] = "claim"
    derived_from: str | None = None  # the claim whose measurement a derived row re-reads
    applies_if: str | None = None  # per-seed 0/1 metric: N/A in every seed where it is 0
    na_reason: str = ""
    reads_mrp: bool = False  # N/A when MRP collapsed in some seed

    def rule(self) -> str:
        if self.op == "within":
            return f"|{self.agg} - {self.target:.3g}| <= {self.threshold:.3g}"
        return f"{self.agg} {self.op} {self.threshold:.3g}"


def claims_for(L: int, mu_test: float) -> list[Claim]:
    sv_err = 1.0 - 1.0 / L
    return [
        Claim("C1", "MRP captures all features its pretraining data shows", "mrp_captured_share", "min", ">=", 1.0,
              reads_mrp=True),
        Claim("C2", "each MRP kernel captures at most one feature", "mrp_max_features_per_capturing_kernel", "max",
              "<=", 1.0, applies_if="mrp_captured_half", reads_mrp=True,
              na_reason="MRP captured fewer than half of the features shown"),
        Claim("C3a", "SL captures about one feature per class", "sl_share_classes_one_feature", "mean", ">=", 0.8),
        Claim("C3b", "SL's winning feature is the one with the larger initial correlation", "sl_lottery_hit_rate",
              "mean", ">=", (1.0 + 1.0 / L) / 2),
        Claim("C4a", "MRP+FT test error near 0 on multi-view data", "ft_err_multi", "mean", "<=", 0.05, reads_mrp=True),
        Claim("C4b", "MRP+FT test error near 0 on single-view data", "ft_err_single", "mean", "<=", 0.05,
              reads_mrp=True),
        Claim("C5a", f"SL single-view test error about {sv_err:.2f}", "sl_err_single", "mean", "within", 0.15, sv_err),
        Claim("C5b", f"SL overall test error about mu*(1-1/L) = {mu_test * sv_err:.3f}", "sl_err", "mean", "within",
              0.10, mu_test * sv_err, kind="derived", derived_from="C5a"),
        Claim("C6", "MRP+FT beats SL on single-view test data", "single_view_gap", "min", ">=", 0.05, reads_mrp=True),
        Claim("C7", "fine-tuning keeps the features MRP captured", "ft_retained_share", "min", ">=", 1.0,
              kind="consistency", reads_mrp=True),
    ]


def _stats(values: list[float]) -> dict[str, float]:
    d = describe(values)
    return {k: d[k] for k in ("mean", "std", "min", "max")}


# Rates are ratios of counts (e.g. 650/1000); compare with a tolerance far below
# one count so that float rounding never flips a verdict at an exact boundary.
_EPS = 1e-9


def verdict(claim: Claim, per_seed: list[float], seeds: list | None = None,
            not_applicable: list | None = None, collapsed: list | None = None) -> dict:
    """One claim's verdict from its per-seed values. ``not_applicable`` / ``collapsed``: the seeds where
    the claim has nothing to judge / where MRP collapsed; either makes the verdict N/A with the reason."""
    stats = _stats(per_seed)
    value = stats[claim.agg]
    reason = ""
    if collapsed and claim.reads_mrp:
        result, reason = "N/A", f"MRP collapsed in seed(s) {', '.join(str(s) for s in collapsed)}"
    elif not_applicable:
        result, reason = "N/A", f"{claim.na_reason} in seed(s) {', '.join(str(s) for s in not_applicable)}"
    elif math.isnan(value) or any(math.isnan(v) for v in per_seed):
        result = "FAIL"  # a seed that could not be measured fails the claim; it is never dropped
        reason = "a seed could not be measured"
    elif claim.op == ">=":
        result = "PASS" if value >= claim.threshold - _EPS else "FAIL"
    elif claim.op == "<=":
        result = "PASS" if value <= claim.threshold + _EPS else "FAIL"
    else:
        result = "PASS" if abs(value - float(claim.target)) <= claim.threshold + _EPS else "FAIL"
    return {
        "id": claim.id,
        "statement": claim.statement,
        "metric": claim.metric,
        "rule": claim.rule(),
        "threshold": claim.threshold,
        "target": claim.target,
        "kind": claim.kind,
        "derived_from": claim.derived_from,
        "per_seed": per_seed,
        **stats,
        "value": value,
        "verdict": result,
        "reason": reason,
    }


def evaluate(per_seed_metrics: list[dict], L: int, mu_test: float) -> list[dict]:
    """Verdicts for every claim from per-seed metric dicts."""
    seeds = [m.get("seed", i) for i, m in enumerate(per_seed_metrics)]
    collapsed = [s for s, m in zip(seeds, per_seed_metrics) if m.get("mrp_collapsed")]
    out = []
    for c in claims_for(L, mu_test):
        na = [s for s, m in zip(seeds, per_seed_metrics) if c.applies_if and not m[c.applies_if]]
        out.append(verdict(c, [float(m[c.metric]) for m in per_seed_metrics], seeds, na, collapsed))
    return out


def tally(verdicts: list[dict]) -> dict[str, int]:
    """PASS / FAIL / N/A counts over the independent claims (kind "claim"); derived rows and
    consistency checks are listed but not counted."""
    main = [v for v in verdicts if v.get("kind", "claim") == "claim"]
    return {"passed": sum(v["verdict"] == "PASS" for v in main), "failed": sum(v["verdict"] == "FAIL" for v in main),
            "not_applicable": sum(v["verdict"] == "N/A" for v in main), "total": len(main)}


def tally_line(verdicts: list[dict]) -> str:
    """'6 of 8 claims PASS (1 N/A); derived C5b PASS; consistency C7 PASS'."""
    t = tally(verdicts)
    line = f"{t['passed']} of {t['total']} claims PASS"
    if t["not_applicable"]:
        line += f" ({t['not_applicable']} N/A)"
    extra = [f"{v['kind']} {v['id']} {v['verdict']}" for v in verdicts if v.get("kind", "claim") != "claim"]
    return line + ("; " + "; ".join(extra) if extra else "")
