"""Training loops: MRP and its control runs trained in lockstep equal each trained alone."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mrplab import config
from mrplab.rng import generator
from mrplab.theory import net, steps
from mrplab.theory.data import make_data
from mrplab.theory.train import RunGens, pretrain_mrp, pretrain_mrp_variants, train_sl
from tests.theory.helpers import wide_matmul_is_exact

SETS = ["data.k=4", "data.d=48", "data.P=8", "data.n_pretrain=120", "mrp.steps=12", "seeds=[0,1]", "threads=2"]


class _Log:
    def __init__(self):
        self.records: list[tuple[str, int, float]] = []

    def log(self, phase, step, state):
        self.records.append((phase, step, state["loss"].sum().item()))

    def advance(self, n=1):
        pass


class _RunLog(_Log):
    """Every log's per-run losses."""

    def log(self, phase, step, state):
        self.records.append((step, state["loss"].tolist()))


def _gens(seeds):
    return RunGens(mask=[generator(s, "mrp:mask") for s in seeds], batch=[generator(s, "mrp:batch") for s in seeds])


@pytest.mark.parametrize("fused,bf16,shared", [(False, False, False), (True, False, False), (True, True, False),
                                               (True, True, True), (False, False, True)])
def test_lockstep_variants_equal_each_variant_trained_alone(fused, bf16, shared):
    """Eager and fused kernels, fp32 and bf16 patches, per-run and shared data. Bitwise where this BLAS computes
    the columns of the variants' one wide matmul as a variant's own (per-run data: helpers.wide_matmul_is_exact
    at the batch's shape: mini-batches of shared data are per-run rows too), else to rounding."""
    cfg = config.load(None, SETS + ["mrp.batch_size=40", f"data.share_across_runs={str(shared).lower()}"])
    data = make_data(cfg.data, cfg.seeds).pretrain  # mini-batches: the batch draw is shared too
    if bf16:
        data = dataclasses.replace(data, X=data.X.to(torch.bfloat16))
    ops = steps.ops(fused)
    W0 = net.init_kernels([generator(s, "init") for s in cfg.seeds], cfg.data.d, cfg.data.k * cfg.net.m,
                          cfg.net.sigma_0)
    variants = {"mrp": {}, "mrp_fitted_decoder": {"fit_decoder": True}, "mrp_shuffled_pairing": {"shuffled": True}}
    batch = data.X[:, :cfg.mrp.batch_size].expand(len(cfg.seeds), -1, -1, -1)  # a mini-batch: per-run rows
    exact = wide_matmul_is_exact(batch, [W0] * len(variants))
    together_log = _Log()
    together = pretrain_mrp_variants(W0, data, cfg.mrp, cfg.net, _gens(cfg.seeds), together_log, 4, ops, variants)
    for phase, overrides in variants.items():
        alone_log = _Log()
        alone = pretrain_mrp(W0, data, cfg.mrp, cfg.net, _gens(cfg.seeds), alone_log, 4, ops=ops, phase=phase,
                             **overrides)
        mine = [r for r in together_log.records if r[0] == phase]
        if exact:
            assert torch.equal(alone.W, together[phase].W), phase
            assert torch.equal(alone.D, together[phase].D), phase
            assert alone_log.records == mine
        else:
            torch.testing.assert_close(together[phase].W, alone.W, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(together[phase].D, alone.D, rtol=1e-4, atol=1e-6)
            assert [r[:2] for r in alone_log.records] == [r[:2] for r in mine]
            assert [r[2] for r in mine] == pytest.approx([r[2] for r in alone_log.records], rel=1e-4)
    # the variants differ from each other (the test would pass vacuously if the overrides were ignored)
    assert not torch.equal(together["mrp"].W, together["mrp_fitted_decoder"].W)
    assert not torch.equal(together["mrp"].W, together["mrp_shuffled_pairing"].W)


def _sl_counting(calls: list[int]) -> steps.PatchOps:
    """The eager kernels, recording how many runs each supervised step computes."""
    def sl(Z, *args):
        calls.append(Z.shape[0])
        return steps.sl_patch_step(Z, *args)
    return steps.PatchOps(steps.EAGER.pool, steps.EAGER.grad, sl=sl)


@pytest.mark.parametrize("batch_size", [None, 40])
def test_sl_runs_that_finish_leave_the_batch_and_each_run_equals_it_trained_alone(batch_size):
    """until_fit: runs finish at different steps; later steps compute only the runs still training, and every
    run's kernels, steps and fit are bitwise those it gets alone (full batch and mini-batches)."""
    seeds = [0, 1, 2, 3]
    cfg = config.load(None, ["data.k=4", "data.d=48", "data.P=8", "data.n_train=80", "sl.steps=2",
                             "sl.max_steps=400", "sl.lr=50", f"sl.batch_size={batch_size or 'null'}",
                             f"seeds={seeds}", "threads=2"])
    data = make_data(cfg.data, seeds).train
    W0 = net.init_kernels([generator(s, "init") for s in seeds], cfg.data.d, cfg.data.k * cfg.net.m, cfg.net.sigma_0)
    K = cfg.data.k * cfg.net.m

    def gens(ss):
        return RunGens(mask=[generator(s, "sl:mask") for s in ss], batch=[generator(s, "sl:batch") for s in ss])

    calls: list[int] = []
    together_log = _RunLog()
    together = train_sl(W0, data, cfg.sl, cfg.net, cfg.data.k, gens(seeds), together_log, 10, _sl_counting(calls))
    assert len(set(together.steps.tolist())) > 1  # the runs finish at different steps (else nothing is tested)
    assert together.fitted.all()
    # each step computes the runs not yet finished: a run that finished at step t computed steps 0..t
    assert sum(calls) == int((together.steps + 1).sum()) < len(seeds) * (int(together.steps.max()) + 1)
    for r, s in enumerate(seeds):
        alone_data = make_data(cfg.data, [s]).train
        alone_log = _RunLog()
        alone = train_sl(W0[r:r + 1], alone_data, cfg.sl, cfg.net, cfg.data.k, gens([s]), alone_log, 10,
                         _sl_counting([]))
        assert torch.equal(alone.W[0], together.W[r]), s
        assert alone.steps.tolist() == [together.steps[r].item()] and alone.fitted.tolist() == [True]
        # the logged losses: the same at every step both logged; after the run finished, its last one
        alone_loss = {step: losses[0] for step, losses in alone_log.records}
        last = alone_loss[max(alone_loss)]
        for step, losses in together_log.records:
            if step in alone_loss:
                assert losses[r] == alone_loss[step], (s, step)
            elif step > max(alone_loss) and batch_size is None:
                assert losses[r] == last, (s, step)
    assert together.W.shape == (len(seeds), cfg.data.d, K)


def test_sl_on_shared_data_drops_finished_runs_too():
    seeds = [0, 1, 2, 3]
    cfg = config.load(None, ["data.k=4", "data.d=48", "data.P=8", "data.n_train=80", "sl.steps=2",
                             "sl.max_steps=400", "sl.lr=50", "data.share_across_runs=true",
                             f"seeds={seeds}", "threads=2"])
    data = make_data(cfg.data, seeds).train
    assert data.X.shape[0] == 1
    W0 = net.init_kernels([generator(s, "init") for s in seeds], cfg.data.d, cfg.data.k * cfg.net.m, cfg.net.sigma_0)
    calls: list[int] = []
    gens = RunGens(mask=[generator(s, "sl:mask") for s in seeds], batch=[generator(s, "sl:batch") for s in seeds])
    res = train_sl(W0, data, cfg.sl, cfg.net, cfg.data.k, gens, _Log(), 50, _sl_counting(calls))
    assert len(set(res.steps.tolist())) > 1 and res.fitted.all()
    assert sum(calls) == int((res.steps + 1).sum())
    for r in range(len(seeds)):  # a finished run's kernels are those of its finishing step: recheck its fit
        loss, _, fits = steps.sl(data.X, data.y, res.W[r:r + 1], cfg.net.q, cfg.net.threshold, cfg.data.k, cfg.net.m)
        assert fits.all()


def test_lockstep_variants_advance_once_per_step_for_all_variants():
    """The progress display counts MRP and its controls as one stage: one advance of V per step, V x steps in all
    (what experiment.planned_phase_steps plans for the stage)."""
    cfg = config.load(None, SETS)
    data = make_data(cfg.data, cfg.seeds).pretrain
    W0 = net.init_kernels([generator(s, "init") for s in cfg.seeds], cfg.data.d, cfg.data.k * cfg.net.m,
                          cfg.net.sigma_0)
    calls = []

    class _Count(_Log):
        def advance(self, n=1):
            calls.append(n)

    variants = {"mrp": {}, "mrp_fitted_decoder": {"fit_decoder": True}, "mrp_shuffled_pairing": {"shuffled": True}}
    pretrain_mrp_variants(W0, data, cfg.mrp, cfg.net, _gens(cfg.seeds), _Count(), 4, steps.EAGER, variants)
    assert calls == [3] * cfg.mrp.steps
