"""The metrics registry and what the experiment measures are the same set of names."""

from __future__ import annotations

from mrplab import config
from mrplab.theory import experiment
from mrplab.theory.claims import claims_for
from mrplab.theory.metrics import METRICS, TIMINGS, store_columns

TINY = [
    "data.k=3", "data.d=32", "data.P=8", "data.n_pretrain=60", "data.n_train=60", "data.n_test=60",
    "sl.steps=5", "sl.until_fit=false", "mrp.steps=5", "finetune.lp_steps=3", "finetune.ft_steps=3",
    "probes.log_every=5", "seeds=[0]", "precision=fp32", "compile=false",
    "finetune.ft_lr=0.01",  # at the default 0.05 this 5-step encoder's fine-tuning diverges (loss 0.9 -> 1e8 in 2 steps)
]


def test_a_run_measures_exactly_the_registered_metrics_and_timings():
    res = experiment.run(config.load(None, TINY))
    assert set(res.per_seed[0]) - {"seed"} == set(METRICS)
    assert tuple(res.timings) == TIMINGS


def test_every_claim_reads_a_registered_metric_and_every_metric_is_described():
    for c in claims_for(2, 0.5):
        assert c.metric in METRICS, c.id
        if c.applies_if:
            assert c.applies_if in METRICS, c.id
    for m in METRICS.values():
        assert m.label and m.better in ("higher", "lower", "none")
    cols = store_columns(["C1"])
    assert "probe.sl_err_single" in cols and "claim.C1.pass" in cols and "time.mrp_s" in cols
