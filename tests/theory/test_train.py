"""Training loops: MRP and its control runs trained in lockstep equal each trained alone."""

from __future__ import annotations

import torch

from mrplab import config
from mrplab.rng import generator
from mrplab.theory import net, steps
from mrplab.theory.data import make_data
from mrplab.theory.train import RunGens, pretrain_mrp, pretrain_mrp_variants

SETS = ["data.k=4", "data.d=48", "data.P=8", "data.n_pretrain=120", "mrp.steps=12", "seeds=[0,1]", "threads=2"]


class _Log:
    def __init__(self):
        self.records: list[tuple[str, int, float]] = []

    def log(self, phase, step, state):
        self.records.append((phase, step, state["loss"].sum().item()))

    def advance(self, n=1):
        pass


def _gens(seeds):
    return RunGens(mask=[generator(s, "mrp:mask") for s in seeds], batch=[generator(s, "mrp:batch") for s in seeds])


def test_lockstep_variants_equal_each_variant_trained_alone():
    cfg = config.load(None, SETS + ["mrp.batch_size=40"])  # mini-batches: the batch draw is shared too
    data = make_data(cfg.data, cfg.seeds).pretrain
    W0 = net.init_kernels([generator(s, "init") for s in cfg.seeds], cfg.data.d, cfg.data.k * cfg.net.m,
                          cfg.net.sigma_0)
    variants = {"mrp": {}, "mrp_fitted_decoder": {"fit_decoder": True}, "mrp_shuffled_pairing": {"shuffled": True}}
    together_log = _Log()
    together = pretrain_mrp_variants(W0, data, cfg.mrp, cfg.net, _gens(cfg.seeds), together_log, 4,
                                     steps.EAGER, variants)
    for phase, overrides in variants.items():
        alone_log = _Log()
        alone = pretrain_mrp(W0, data, cfg.mrp, cfg.net, _gens(cfg.seeds), alone_log, 4, phase=phase, **overrides)
        assert torch.equal(alone.W, together[phase].W), phase
        assert torch.equal(alone.D, together[phase].D), phase
        assert alone_log.records == [r for r in together_log.records if r[0] == phase]
    # the variants differ from each other (the test would pass vacuously if the overrides were ignored)
    assert not torch.equal(together["mrp"].W, together["mrp_fitted_decoder"].W)
    assert not torch.equal(together["mrp"].W, together["mrp_shuffled_pairing"].W)
