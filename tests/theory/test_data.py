"""The multi-view data model: feature bank and sampler statistics."""

from __future__ import annotations

import math

import pytest
import torch

from mrplab.config import DataConfig
from mrplab.rng import generator
from mrplab.theory.data import make_data, make_feature_bank, sample

BASE = dict(
    k=5, L=2, d=64, P=20, C_p=2, features="orthonormal", c_hi=1.5, rho=0.05, s=2.0, c_lo=0.1,
    off_class_max=0.4, Gamma=0.2, gamma=0.02, sigma_p=None, n_pretrain=40, n_train=30, n_test=20,
    mu_pretrain=0.0, mu_train=0.0, mu_test=0.5, coverage=1.0, extra_pretrain_classes=0, share_across_runs=False,
)


def cfg(**kw) -> DataConfig:
    return DataConfig(**{**BASE, **kw})


def draw(c: DataConfig, n: int, mu: float, seed: int = 0, pretraining: bool = False, bank=None):
    bank = bank if bank is not None else make_feature_bank(c, generator(0, "feature_bank"))
    return bank, sample(c, bank, n, mu, generator(seed, "test-sample"), pretraining)


def four_sigma(p: float, n: int) -> float:
    return 4 * math.sqrt(p * (1 - p) / n) + 1e-9


# --------------------------------------------------------------------------- feature bank


def test_orthonormal_bank():
    c = cfg(k=10, L=3, d=40)
    bank = make_feature_bank(c, generator(0, "feature_bank"))
    assert bank.V.shape == (10, 3, 40) and bank.flat.shape == (30, 40)
    assert bank.k == 10 and bank.k_total == 10 and bank.L == 3
    G = bank.flat @ bank.flat.T
    torch.testing.assert_close(G, torch.eye(30), atol=1e-5, rtol=0)
    # fills the space exactly when F == d
    c2 = cfg(k=8, L=2, d=16)
    b2 = make_feature_bank(c2, generator(1, "feature_bank"))
    torch.testing.assert_close(b2.flat @ b2.flat.T, torch.eye(16), atol=1e-5, rtol=0)


def test_random_bank_unit_norm_not_orthogonal():
    c = cfg(k=10, L=2, d=15, features="random")  # 20 features in 15 dims: only the random option fits
    bank = make_feature_bank(c, generator(0, "feature_bank"))
    norms = bank.flat.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(20), atol=1e-5, rtol=0)
    G = bank.flat @ bank.flat.T
    off = G - torch.diag(torch.diag(G))
    assert off.abs().max() > 0.05  # random unit vectors, not an orthonormal set


def test_bank_deterministic_and_seed_dependent():
    c = cfg()
    a = make_feature_bank(c, generator(3, "feature_bank"))
    b = make_feature_bank(c, generator(3, "feature_bank"))
    other = make_feature_bank(c, generator(4, "feature_bank"))
    assert torch.equal(a.V, b.V) and torch.equal(a.covered, b.covered)
    assert not torch.allclose(a.V, other.V)


# --------------------------------------------------------------------------- sampler structure (gamma = 0)


def _off_classes(data, L: int, k_cls: int) -> torch.Tensor:
    """[N, k_cls] bool: which classes' features sit on some patch, from the ground truth."""
    n = data.y.shape[0]
    fp = data.feature_patch
    has = torch.zeros(n, k_cls * L, dtype=torch.bool)
    rows = torch.arange(n).unsqueeze(1).expand_as(fp)
    valid = fp >= 0
    has[rows[valid], fp[valid]] = True
    return has.view(n, k_cls, L)


@pytest.mark.parametrize("off_class", ["per_feature", "per_class"])
def test_structure_exact_without_feature_noise(off_class):
    c = cfg(gamma=0.0, k=5, L=3, P=24, C_p=2, sigma_p=0.0, off_class=off_class)
    n = 3000
    bank, data = draw(c, n, mu=0.4)
    L, P, C_p, F = c.L, c.P, c.C_p, c.k * c.L
    N = torch.arange(n)
    assert data.X.shape == (n, P, c.d) and data.coef.shape == (n, P, F) and data.feature_patch.shape == (n, P)
    # X is exactly the feature signal when sigma_p = 0
    torch.testing.assert_close(data.X, data.coef @ bank.flat, atol=1e-6, rtol=0)

    # every patch carries at most one feature, and feature_patch names it
    nz = data.coef > 0
    assert (nz.sum(-1) <= 1).all()
    fp = data.feature_patch
    assert ((fp >= 0) == nz.any(-1)).all()
    carried = torch.where(fp >= 0, data.coef.gather(-1, fp.clamp(min=0).unsqueeze(-1)).squeeze(-1), torch.zeros(()))
    torch.testing.assert_close(carried.sum(-1), data.coef.sum((-1, -2)))

    totals = data.coef.sum(1)  # [N, F] per-sample weight sum of every feature
    n_patches = torch.stack([(fp == f).sum(-1) for f in range(F)], dim=-1)  # [N, F]
    assert ((n_patches == 0) | (n_patches == C_p)).all()  # a present feature sits in exactly C_p patches
    assert ((n_patches == C_p) == (totals > 0)).all()

    own = totals.view(n, c.k, L)[N, data.y]  # [N, L]
    sv = data.single_view
    assert ((own[~sv] >= 1 - 1e-6) & (own[~sv] <= c.c_hi + 1e-6)).all()
    dom = data.dominant
    assert (dom[~sv] == -1).all() and ((dom[sv] >= 0) & (dom[sv] < L)).all()
    dom_w = own[sv, dom[sv]]
    assert ((dom_w >= 1 - 1e-6) & (dom_w <= c.c_hi + 1e-6)).all()
    is_dom = torch.arange(L).unsqueeze(0) == dom[sv].unsqueeze(1)
    torch.testing.assert_close(own[sv][~is_dom], torch.full(((~is_dom).sum().item(),), c.rho))
    # strong weights spread over [1, c_hi] rather than sitting at one end
    assert own[~sv].min() < 1.05 and own[~sv].max() > c.c_hi - 0.05

    # off-class features: multi-view in [c_lo, off_class_max], single-view exactly Gamma
    cls_tot = totals.view(n, c.k, L).clone()
    cls_tot[N, data.y] = 0.0
    present = cls_tot > 0
    whole = present.all(-1) | ~present.any(-1)
    if off_class == "per_class":
        assert whole.all()  # a class is kept whole or not at all
    else:
        assert not whole.all()  # features join one at a time: partial classes are common
    mv = cls_tot[~sv][present[~sv]]
    assert mv.numel() > 100
    assert ((mv >= c.c_lo - 1e-6) & (mv <= c.off_class_max + 1e-6)).all()
    svv = cls_tot[sv][present[sv]]
    assert svv.numel() > 100
    torch.testing.assert_close(svv, torch.full_like(svv, c.Gamma))
    # the whole sample fits in P patches
    assert ((fp >= 0).sum(-1) <= P).all()


def test_feature_noise_and_slack():
    c = cfg(gamma=0.02, k=5, L=2, P=20, C_p=2)
    n = 2000
    bank, data = draw(c, n, mu=0.5, seed=1)
    fp = data.feature_patch
    N = torch.arange(n)
    F = c.k * c.L
    assert (data.coef >= 0).all()
    # off the carried feature, every coefficient is pure feature noise in [0, gamma]
    carried = torch.nn.functional.one_hot(fp.clamp(min=0), F).bool() & (fp >= 0).unsqueeze(-1)
    noise_only = data.coef[~carried]
    assert noise_only.max() <= c.gamma + 1e-7
    assert noise_only.mean().item() == pytest.approx(c.gamma / 2, rel=0.02)
    assert noise_only.min() < 0.01 * c.gamma and noise_only.max() > 0.99 * c.gamma

    # per-sample sums: strong features in [1, c_hi + P*gamma]; non-dominant single-view ~ rho
    totals = data.coef.sum(1).view(n, c.k, c.L)
    own = totals[N, data.y]
    sv = data.single_view
    slack = c.P * c.gamma
    assert ((own[~sv] >= 1) & (own[~sv] <= c.c_hi + slack)).all()
    dom = data.dominant
    assert ((own[sv, dom[sv]] >= 1) & (own[sv, dom[sv]] <= c.c_hi + slack)).all()
    nd = own[sv, 1 - dom[sv]]  # L = 2: the other own feature
    assert ((nd >= c.rho) & (nd <= c.rho + slack)).all()
    # on its own C_p patches the non-dominant feature weighs rho plus at most C_p * gamma of noise
    f_nd = data.y[sv] * c.L + (1 - dom[sv])
    on_patch = (data.coef[sv].gather(-1, f_nd.view(-1, 1, 1).expand(-1, c.P, 1)).squeeze(-1)
                * (fp[sv] == f_nd.unsqueeze(1)))
    s_nd = on_patch.sum(-1)
    assert ((s_nd >= c.rho - 1e-6) & (s_nd <= c.rho + c.C_p * c.gamma + 1e-6)).all()

    # ground truth: every carried coefficient is positive; a strong own feature dominates its patch
    val = data.coef.gather(-1, fp.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    assert (val[fp >= 0] > 0).all()
    strong = (fp >= 0) & (fp // c.L == data.y.unsqueeze(1))
    strong &= ~(sv.unsqueeze(1) & (fp % c.L != dom.unsqueeze(1)))
    assert strong.sum() > 1000
    assert (data.coef.argmax(-1)[strong] == fp[strong]).all()
    assert (val[strong] > c.gamma).all()


def test_single_view_fraction():
    c = cfg()
    for mu in (0.0, 0.3, 1.0):
        _, data = draw(c, 4000, mu=mu, seed=2)
        frac = data.single_view.float().mean().item()
        assert abs(frac - mu) <= four_sigma(mu, 4000)
        assert ((data.dominant >= 0) == data.single_view).all()


def test_labels_uniform():
    c = cfg(k=5)
    _, data = draw(c, 5000, mu=0.0, seed=3)
    counts = torch.bincount(data.y, minlength=5).float() / 5000
    assert data.y.min() >= 0 and data.y.max() < 5
    assert (counts - 0.2).abs().max() <= four_sigma(0.2, 5000)


def test_off_class_frequency_without_cap():
    c = cfg(k=5, L=2, P=20, C_p=2, s=2.0, off_class="per_class")  # room for 8 more features = all 4 other classes
    n = 4000
    _, data = draw(c, n, mu=0.3, seed=4)
    has = _off_classes(data, c.L, c.k).any(-1)  # [N, k]
    p = c.s / c.k
    for j in range(c.k):
        other = data.y != j
        freq = has[other, j].float().mean().item()
        assert abs(freq - p) <= four_sigma(p, int(other.sum()))


def test_off_class_features_join_one_at_a_time_with_probability_s_over_k():
    # room for 8 more features = all 4 other classes' features, so nothing is dropped
    c = cfg(k=5, L=2, P=20, C_p=2, s=2.0)
    assert c.off_class == "per_feature"  # the multi-view model is the default
    n = 6000
    _, data = draw(c, n, mu=0.3, seed=4)
    has = _off_classes(data, c.L, c.k)  # [N, k, L]
    p = c.s / c.k
    for j in range(c.k):
        other = data.y != j
        for l in range(c.L):
            freq = has[other, j, l].float().mean().item()
            assert abs(freq - p) <= four_sigma(p, int(other.sum())), (j, l, freq)
        # independent: both features of class j together with probability p^2, one alone 2 p (1 - p)
        both = has[other, j].all(-1).float().mean().item()
        assert abs(both - p * p) <= four_sigma(p * p, int(other.sum())), (j, both)
        one = (has[other, j].sum(-1) == 1).float().mean().item()
        assert abs(one - 2 * p * (1 - p)) <= four_sigma(2 * p * (1 - p), int(other.sum())), (j, one)


def test_off_class_frequency_with_cap():
    # P = 8, L * C_p = 4: room for 2 more features = exactly one off class per sample
    c = cfg(k=5, L=2, P=8, C_p=2, s=2.0, off_class="per_class")
    n = 4000
    _, data = draw(c, n, mu=0.0, seed=5)
    has = _off_classes(data, c.L, c.k)
    whole = has.all(-1)
    assert (has.any(-1) == whole).all()  # partial classes never appear
    off = whole.clone()
    off[torch.arange(n), data.y] = False
    per_sample = off.sum(-1)
    assert per_sample.max() <= 1
    p = c.s / c.k
    p_any = 1 - (1 - p) ** (c.k - 1)  # some other class drew present -> exactly one is kept
    assert abs(per_sample.float().mean().item() - p_any) <= four_sigma(p_any, n)
    for j in range(c.k):
        other = data.y != j
        freq = off[other, j].float().mean().item()
        assert abs(freq - p_any / (c.k - 1)) <= four_sigma(p_any / (c.k - 1), int(other.sum()))
    assert ((data.feature_patch >= 0).sum(-1) <= c.P).all()


@pytest.mark.parametrize("sigma_p", [None, 0.05])
def test_patch_noise_std(sigma_p):
    c = cfg(d=128, sigma_p=sigma_p)
    bank, data = draw(c, 600, mu=0.5, seed=6)
    xi = data.noise(bank)
    assert xi.shape == data.X.shape
    target = sigma_p if sigma_p is not None else 0.2 / math.sqrt(c.d)
    assert c.noise_std == pytest.approx(target)
    assert xi.std().item() == pytest.approx(target, rel=0.02)
    assert abs(xi.mean().item()) < 0.01 * target
    # noise is isotropic: its component along a feature has the same std
    along = xi @ bank.flat.T
    assert along.std().item() == pytest.approx(target, rel=0.03)


# --------------------------------------------------------------------------- coverage and extra classes


def test_coverage_hides_features_in_pretraining_only():
    c = cfg(k=10, L=2, d=64, coverage=0.5, gamma=0.02)
    bank = make_feature_bank(c, generator(0, "feature_bank"))
    assert bank.covered.shape == (10, 2)
    assert int(bank.covered.sum()) == 10  # half of the 20 downstream features
    hidden = ~bank.covered.reshape(-1)
    _, pre = draw(c, 1500, mu=0.0, seed=7, pretraining=True, bank=bank)
    _, tr = draw(c, 1500, mu=0.0, seed=8, pretraining=False, bank=bank)
    # hidden: no weight and no feature noise at all in pretraining
    assert (pre.coef[..., hidden] == 0).all()
    assert (pre.coef[..., ~hidden] > 0).float().mean() > 0.99  # the shown ones get feature noise everywhere
    assert not torch.isin(pre.feature_patch, hidden.nonzero().squeeze(1)).any()
    torch.testing.assert_close(pre.X - pre.coef @ bank.flat, pre.noise(bank))
    # and the pretraining signal is orthogonal to the hidden features up to the Gaussian noise
    hid_proj = (pre.X @ bank.flat[hidden].T)
    assert hid_proj.std().item() == pytest.approx(c.noise_std, rel=0.05)
    # present in downstream samples, both as carried features and as feature noise
    assert (tr.coef[..., hidden] > 0).float().mean() > 0.99
    for f in hidden.nonzero().squeeze(1).tolist():
        assert (tr.feature_patch == f).any(), f"hidden feature {f} never carried in train data"
    # a pretraining sample carries its own shown features on C_p patches each, its hidden ones on none
    own_ids = pre.y.unsqueeze(1) * c.L + torch.arange(c.L)  # [N, L]
    n_on = (pre.feature_patch.unsqueeze(-1) == own_ids.unsqueeze(1)).sum(1)  # [N, L]
    shown_own = bank.covered[pre.y]  # [N, L]
    assert (n_on[shown_own] == c.C_p).all()
    assert (n_on[~shown_own] == 0).all()
    assert (~shown_own).all(-1).sum() > 20  # some samples lose their whole class signal


def test_coverage_full_and_zero():
    full = make_feature_bank(cfg(coverage=1.0), generator(0, "feature_bank"))
    assert full.covered.all()
    none = make_feature_bank(cfg(coverage=0.0, extra_pretrain_classes=2), generator(0, "feature_bank"))
    assert not none.covered[:5].any() and none.covered[5:].all()  # extra classes are always shown


def test_extra_pretrain_classes_only_in_pretraining():
    c = cfg(k=4, L=2, d=64, extra_pretrain_classes=2, P=20)
    bank = make_feature_bank(c, generator(0, "feature_bank"))
    assert bank.k == 4 and bank.k_total == 6 and bank.V.shape == (6, 2, 64)
    torch.testing.assert_close(bank.flat @ bank.flat.T, torch.eye(12), atol=1e-5, rtol=0)
    _, pre = draw(c, 3000, mu=0.0, seed=9, pretraining=True, bank=bank)
    _, te = draw(c, 3000, mu=0.5, seed=10, pretraining=False, bank=bank)
    assert set(pre.y.unique().tolist()) == set(range(6))
    assert set(te.y.unique().tolist()) == set(range(4))
    # extra classes' features are carried in pretraining, never in downstream samples
    assert (pre.feature_patch >= 8).any()
    assert (te.feature_patch < 8).all()
    assert pre.coef.shape[-1] == 12 and te.coef.shape[-1] == 12


# --------------------------------------------------------------------------- determinism and make_data


def test_sample_deterministic():
    c = cfg()
    bank = make_feature_bank(c, generator(0, "feature_bank"))
    a = sample(c, bank, 50, 0.5, generator(1, "x"))
    b = sample(c, bank, 50, 0.5, generator(1, "x"))
    d = sample(c, bank, 50, 0.5, generator(2, "x"))
    for name in ("X", "y", "single_view", "dominant", "coef", "feature_patch"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.X, d.X)
    assert not torch.equal(a.coef, d.coef)


@pytest.mark.parametrize("share", [False, True])
def test_make_data_shapes_and_determinism(share):
    c = cfg(share_across_runs=share, n_pretrain=30, n_train=20, n_test=10)
    seeds = [3, 5, 7]
    td = make_data(c, seeds)
    Rd = 1 if share else 3
    for name, n in (("pretrain", 30), ("train", 20), ("test", 10)):
        ds = getattr(td, name)
        assert ds.X.shape == (Rd, n, c.P, c.d), name
        assert ds.y.shape == (Rd, n) and ds.coef.shape == (Rd, n, c.P, c.k * c.L)
        assert ds.n == n
    again = make_data(c, seeds)
    assert torch.equal(td.pretrain.X, again.pretrain.X) and torch.equal(td.test.y, again.test.y)
    assert torch.equal(td.bank.V, again.bank.V)
    other = make_data(c, [4, 5, 7])
    assert torch.equal(td.bank.V, other.bank.V)  # the bank comes from bank_seed, not from the run seeds
    assert not torch.equal(td.bank.V, make_data(c.model_copy(update={"bank_seed": 1}), seeds).bank.V)
    if not share:
        # a run's samples do not depend on which other seeds are batched with it
        assert torch.equal(td.train.X[1], other.train.X[1])
    if not share:
        assert not torch.equal(td.train.X[0], td.train.X[1])  # runs get their own samples
        # run r's data is its own seed's stream, whatever the other seeds are
        ref = sample(c, td.bank, c.n_train, c.mu_train, generator(5, "train"))
        assert torch.equal(td.train.X[1], ref.X) and torch.equal(td.train.y[1], ref.y)
        ref_pre = sample(c, td.bank, c.n_pretrain, c.mu_pretrain, generator(7, "pretrain"), True)
        assert torch.equal(td.pretrain.coef[2], ref_pre.coef)
    # pretrain/train/test are different streams
    assert not torch.equal(td.train.X[0, :10], td.test.X[0, :10])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patches_written_in_place_are_the_sampled_ones(dtype):
    """make_data writes each seed's patches into the stacked buffer (fp32, or bf16 rounded from fp32): the
    same numbers as sampling alone, and bf16 data is exactly the fp32 data rounded."""
    c = cfg(n_pretrain=30, n_train=20, n_test=10)
    bank = make_feature_bank(c, generator(0, "feature_bank"))
    alone = sample(c, bank, 40, 0.5, generator(1, "x"))
    out = torch.full((40, c.P, c.d), float("nan"), dtype=dtype)
    placed = sample(c, bank, 40, 0.5, generator(1, "x"), out=out)
    assert placed.X is out and torch.equal(out, alone.X.to(dtype))
    assert torch.equal(placed.coef, alone.coef) and torch.equal(placed.y, alone.y)
    ref = make_data(c, [3, 5])
    got = make_data(c, [3, 5], dtype)
    for name in ("pretrain", "train", "test"):
        r, g = getattr(ref, name), getattr(got, name)
        assert g.X.dtype == dtype and torch.equal(g.X, r.X.to(dtype)), name
        assert torch.equal(g.coef, r.coef) and torch.equal(g.feature_patch, r.feature_patch), name
