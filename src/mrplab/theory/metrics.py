"""Every per-seed number a theory run measures, in one place: its name, a label for tables and
plots, its unit, and which direction is better. ``experiment.measure`` produces exactly these
keys (a test holds the two together); the claims, the sweep store's ``probe.*`` columns, sweep
reports and sweep files refer to them by name, and a sweep file naming an unknown metric is
rejected when it is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Metric:
    name: str
    label: str
    unit: str = ""  # "share" (0..1), "count", "error" (0..1), "steps", "cos", "ratio", "flag" (0/1), ""
    better: Literal["higher", "lower", "none"] = "none"


def _m(name: str, label: str, unit: str = "", better: Literal["higher", "lower", "none"] = "none") -> Metric:
    return Metric(name, label, unit, better)


# seconds per phase of a run (summary.json "timings", the store's time.* columns)
TIMINGS = ("runtime_choice_s", "data_s", "sl_s", "mrp_s", "finetune_s", "probes_s", "total_s")


def store_columns(claim_ids: list[str]) -> set[str]:
    """The result columns a sweep store holds for a theory run: probe.<metric>, claim.<id>.pass and
    .value, time.<phase>, claims_passed, claims_total, and the run's wall_s."""
    return ({f"probe.{m}" for m in METRICS} | {f"claim.{c}.{k}" for c in claim_ids for k in ("pass", "value")}
            | {f"time.{t}" for t in TIMINGS} | {"claims_passed", "claims_total", "wall_s"})


_CONTROL_LABELS = {"fitted_decoder": "fitted-decoder control", "shuffled_pairing": "shuffled-pairing control"}

METRICS: dict[str, Metric] = {m.name: m for m in [
    _m("mrp_captured", "MRP: features captured", "count", "higher"),
    _m("mrp_captured_shown", "MRP: shown features captured", "count", "higher"),
    _m("n_features_shown", "features the pretraining data shows", "count"),
    _m("mrp_captured_share", "MRP: share of shown features captured", "share", "higher"),
    _m("mrp_captured_half", "MRP captured at least half of the shown features", "flag"),
    _m("mrp_captured_hidden", "MRP: hidden features captured", "count"),
    _m("mrp_max_features_per_kernel", "MRP: most features on one kernel", "count", "lower"),
    _m("mrp_max_features_per_capturing_kernel", "MRP: most features on one capturing kernel", "count", "lower"),
    _m("mrp_kernels_capturing", "MRP: kernels capturing a feature", "count"),
    _m("mrp_pure_kernels", "MRP: pure capturing kernels (one feature)", "count"),
    _m("mrp_fused_kernels", "MRP: fused capturing kernels (several features)", "count", "lower"),
    _m("mrp_pure_kernel_share", "MRP: share of capturing kernels that are pure", "share", "higher"),
    _m("mrp_features_held_by_pure_share", "MRP: share of shown features held by a pure kernel", "share", "higher"),
    _m("mrp_alignment_init", "feature alignment at init (max cos over kernels)", "cos"),
    _m("mrp_alignment", "MRP: feature alignment (max cos over kernels)", "cos", "higher"),
    _m("mrp_norm_growth", "MRP: kernel norm, end / init", "ratio"),
    _m("mrp_spread_ratio", "MRP: output spread, end / init", "ratio"),
    _m("mrp_effective_rank", "MRP: effective rank of the outputs", ""),
    _m("mrp_collapsed", "MRP collapsed", "flag", "lower"),
    *(m for c, lab in _CONTROL_LABELS.items() for m in (
        _m(f"mrp_{c}_captured_share", f"MRP, {lab}: share of shown features captured", "share"),
        _m(f"mrp_{c}_alignment", f"MRP, {lab}: feature alignment", "cos"),
        _m(f"mrp_{c}_norm_growth", f"MRP, {lab}: kernel norm, end / init", "ratio"),
    )),
    _m("sl_captured", "SL: features captured", "count"),
    _m("sl_captured_per_class_mean", "SL: features captured per class", "count"),
    _m("sl_share_classes_one_feature", "SL: share of classes with exactly one feature", "share"),
    *(_m(f"sl_share_classes_one_feature_at_{f}x", f"SL: share of classes with exactly one feature at {f} x threshold",
         "share") for f in ("0.5", "1", "2", "4")),
    _m("sl_lottery_hit_rate", "SL: lottery predicted by init", "share"),
    _m("sl_winner_per_class", "SL: winning feature per class (-1: none)", ""),
    _m("sl_predicted_winner_per_class", "SL: feature with the larger initial correlation per class", ""),
    _m("sl_steps", "SL: steps trained", "steps"),
    _m("sl_fitted", "SL fitted every training sample", "flag", "higher"),
    _m("ft_captured", "MRP+FT: features captured", "count", "higher"),
    _m("ft_retained_share", "MRP+FT: share of MRP features kept", "share", "higher"),
    _m("sl_err", "SL test error", "error", "lower"),
    _m("sl_err_multi", "SL multi-view test error", "error", "lower"),
    _m("sl_err_single", "SL single-view test error", "error", "lower"),
    _m("ft_err", "MRP+FT test error", "error", "lower"),
    _m("ft_err_multi", "MRP+FT multi-view test error", "error", "lower"),
    _m("ft_err_single", "MRP+FT single-view test error", "error", "lower"),
    _m("single_view_gap", "single-view error gap, SL minus MRP+FT", "error", "higher"),
    _m("noise_memorisation_sl", "SL: largest kernel response to patch noise", ""),
    _m("noise_memorisation_mrp", "MRP: largest kernel response to patch noise", ""),
]}
