"""The multi-view data model: a feature bank and a multi-view / single-view sampler.

Class i owns L discriminative features v_{i,1..L} (unit vectors in R^d). A
sample X = (x_1, ..., x_P) has P patches and a label y:

* multi-view: every feature of class y sits in C_p patches whose weights sum
  to U[1, c_hi];
* single-view: one dominant feature of class y (uniform over L) sums to
  U[1, c_hi]; the other features of y sum to exactly ``rho``;
* every feature of every other class joins the sample on its own with
  probability s/k (``off_class=per_class``: a whole class joins or not) and
  sits in C_p patches summing to U[c_lo, off_class_max] (multi-view) or
  ``Gamma`` (single-view); when the P patches run out the remaining ones are
  dropped, in a random order;
* every patch gets feature noise U[0, gamma] along every feature, plus
  Gaussian noise N(0, sigma_p^2 I); patches with no feature are noise only.

Coverage: the pretraining data can show only a subset of the downstream
features (``coverage``) and can hold ``extra_pretrain_classes`` classes the
downstream task never uses. A hidden feature is absent from a pretraining
sample entirely (no weight, no feature noise); its patches are noise only.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from mrplab.config import DataConfig
from mrplab.rng import generator


@dataclass
class FeatureBank:
    V: torch.Tensor  # [k_total, L, d] unit vectors
    k: int  # downstream classes (the first k rows of V)
    covered: torch.Tensor  # [k_total, L] bool: shown by the pretraining data

    @property
    def flat(self) -> torch.Tensor:
        return self.V.reshape(-1, self.V.shape[-1])  # [F, d]

    @property
    def k_total(self) -> int:
        return self.V.shape[0]

    @property
    def L(self) -> int:
        return self.V.shape[1]


@dataclass
class MultiViewData:
    """One data set with its ground truth. Leading axes may carry a run axis."""

    X: torch.Tensor  # [N, P, d] patches
    y: torch.Tensor  # [N] labels
    single_view: torch.Tensor  # [N] bool
    dominant: torch.Tensor  # [N] dominant feature l of a single-view sample, -1 for multi-view
    coef: torch.Tensor  # [N, P, F] weight of every feature on every patch (F = k_total * L)
    feature_patch: torch.Tensor  # [N, P] flat id i*L+l of the feature a patch carries, -1 = noise only

    @property
    def n(self) -> int:
        return self.X.shape[-3]

    def noise(self, bank: FeatureBank) -> torch.Tensor:
        """The Gaussian noise xi of every patch: X minus its feature signal."""
        return self.X - self.coef @ bank.flat  # [..., N, P, d]

    def runs(self, s: slice) -> "MultiViewData":
        """The data of runs s of a set with a leading run axis; a set shared by all runs (axis size 1) as is."""
        if self.X.shape[0] == 1:
            return self
        return MultiViewData(**{f.name: getattr(self, f.name)[s] for f in fields(self)})

    def to(self, device: torch.device | str) -> "MultiViewData":
        return MultiViewData(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @staticmethod
    def stack(items: list["MultiViewData"], X: torch.Tensor | None = None) -> "MultiViewData":
        """The items along a new leading axis; ``X`` = their patches already stacked (see make_data)."""
        return MultiViewData(**{f.name: X if f.name == "X" and X is not None else
                                torch.stack([getattr(it, f.name) for it in items]) for f in fields(MultiViewData)})


def make_feature_bank(cfg: DataConfig, g: torch.Generator) -> FeatureBank:
    k_total = cfg.k + cfg.extra_pretrain_classes
    n_feat = k_total * cfg.L
    A = torch.randn(cfg.d, n_feat, generator=g, dtype=torch.float64)
    if cfg.features == "orthonormal":
        Q, R = torch.linalg.qr(A)  # [d, F]
        Q = Q * torch.sign(torch.diagonal(R))  # unique QR: a fixed sign convention
        V = Q.T
    else:
        V = (A / A.norm(dim=0, keepdim=True)).T
    V = V.to(torch.float32).reshape(k_total, cfg.L, cfg.d)  # [k_total, L, d]
    covered = torch.ones(k_total, cfg.L, dtype=torch.bool)
    n_down = cfg.k * cfg.L
    n_hidden = n_down - int(round(cfg.coverage * n_down))
    if n_hidden > 0:
        hidden = torch.randperm(n_down, generator=g)[:n_hidden]
        covered.view(-1)[hidden] = False
    return FeatureBank(V=V, k=cfg.k, covered=covered)


def _split_weights(total: torch.Tensor, C_p: int, g: torch.Generator) -> torch.Tensor:
    """Split each total over C_p patches with random positive shares: [..., C_p]."""
    u = torch.rand(*total.shape, C_p, generator=g) + 0.1
    return total.unsqueeze(-1) * u / u.sum(-1, keepdim=True)


def sample(
    cfg: DataConfig,
    bank: FeatureBank,
    n: int,
    mu: float,
    g: torch.Generator,
    pretraining: bool = False,
    out: torch.Tensor | None = None,
) -> MultiViewData:
    """Draw n samples, a fraction ~mu of them single-view (Bernoulli per sample).

    ``out`` [n, P, d]: where the patches go (in its dtype: bf16 patches are the fp32 ones rounded);
    the returned X is then ``out``. Same numbers either way."""
    L, P, C_p = cfg.L, cfg.P, cfg.C_p
    k_cls = bank.k_total if pretraining else bank.k  # classes this data set draws from
    F = bank.k_total * L
    shown = bank.covered.reshape(-1) if pretraining else torch.ones(F, dtype=torch.bool)  # [F]

    y = torch.randint(0, k_cls, (n,), generator=g)  # [N]
    single = torch.rand(n, generator=g) < mu  # [N]
    dominant = torch.randint(0, L, (n,), generator=g)
    dominant = torch.where(single, dominant, torch.full_like(dominant, -1))

    # own features: totals [N, L]
    strong = 1.0 + (cfg.c_hi - 1.0) * torch.rand(n, L, generator=g)
    is_dom = torch.arange(L).unsqueeze(0) == dominant.unsqueeze(1)  # [N, L]
    own_total = torch.where(single.unsqueeze(1) & ~is_dom, torch.full_like(strong, cfg.rho), strong)

    # off-class features, in units that join a sample or not: one feature at a time
    # (the multi-view model) or a whole class at once (data.off_class=per_class);
    # units are placed in a random order until the free patches run out
    cap = (P - L * C_p) // C_p  # how many more features fit, C_p patches each
    u = L if cfg.off_class == "per_class" else 1  # features per unit
    n_units = k_cls * L // u
    present = torch.rand(n, n_units, generator=g) < (cfg.s / bank.k)  # [N, n_units]
    own_unit = (y * L).unsqueeze(1) // u + torch.arange(L // u).unsqueeze(0)  # [N, L/u] units of class y
    present.scatter_(1, own_unit, False)
    order = torch.argsort(torch.rand(n, n_units, generator=g), dim=1)  # random unit priority
    present_sorted = torch.gather(present, 1, order)
    rank = torch.cumsum(present_sorted.long(), 1) - 1  # rank among present units
    keep_sorted = present_sorted & ((rank + 1) * u <= cap)  # a unit is kept whole or not at all
    keep = torch.zeros_like(present).scatter(1, order, keep_sorted)  # [N, n_units]
    unit_slot = L + torch.zeros_like(rank).scatter(1, order, rank) * u  # [N, n_units] first slot of a kept unit
    off_hi = torch.where(single, torch.full((n,), cfg.Gamma), torch.full((n,), cfg.off_class_max))
    off_lo = torch.where(single, torch.full((n,), cfg.Gamma), torch.full((n,), cfg.c_lo))
    off_total = off_lo[:, None, None] + (off_hi - off_lo)[:, None, None] * torch.rand(n, k_cls, L, generator=g)

    # features per sample in slot order: own first, then kept off-class classes
    # slot s of a sample covers patches perm[s*C_p:(s+1)*C_p]
    perm = torch.argsort(torch.rand(n, P, generator=g), dim=1)  # [N, P] random patch order
    coef = torch.zeros(n, P, F)
    feature_patch = torch.full((n, P), -1, dtype=torch.long)
    rows = torch.arange(n)

    def place(slot: torch.Tensor, feat: torch.Tensor, total: torch.Tensor, active: torch.Tensor) -> None:
        # slot, feat, total, active: [N]
        w = _split_weights(total, C_p, g)  # [N, C_p]
        for c in range(C_p):
            pidx = perm[rows, (slot * C_p + c).clamp(max=P - 1)]
            val = torch.where(active, w[:, c], torch.zeros_like(w[:, c]))
            coef[rows, pidx, feat] += val
            feature_patch[rows, pidx] = torch.where(active, feat, feature_patch[rows, pidx])

    always = torch.ones(n, dtype=torch.bool)
    for l in range(L):
        place(torch.full((n,), l), y * L + l, own_total[:, l], always)
    for f in range(k_cls * L):
        j, l = divmod(f, L)
        unit = f // u
        place(unit_slot[:, unit] + f % u, torch.full((n,), f), off_total[:, j, l], keep[:, unit])

    coef = coef + cfg.gamma * torch.rand(n, P, F, generator=g)  # feature noise on every patch
    coef = coef * shown  # features the data set does not show are absent entirely
    feature_patch = torch.where(
        (feature_patch >= 0) & shown[feature_patch.clamp(min=0)], feature_patch, torch.full_like(feature_patch, -1)
    )
    # X = coef @ bank.flat + noise_std * randn, written into one buffer (the data sets are the run's
    # largest allocations: no temporaries, no stacked copy)
    fp32_out = out is not None and out.dtype == torch.float32
    X = torch.randn(n, P, cfg.d, generator=g, out=out if fp32_out else None).mul_(cfg.noise_std)
    X.add_(coef @ bank.flat)  # [N, P, d]
    if out is not None and not fp32_out:
        X = out.copy_(X)
    return MultiViewData(X=X, y=y, single_view=single, dominant=dominant, coef=coef, feature_patch=feature_patch)


@dataclass
class TheoryData:
    bank: FeatureBank
    pretrain: MultiViewData  # [Rd, N, P, d] with Rd = 1 (shared) or R
    train: MultiViewData
    test: MultiViewData


def make_data(cfg: DataConfig, seeds: list[int], x_dtype: torch.dtype = torch.float32) -> TheoryData:
    """Data for every run, patches in ``x_dtype`` (bf16: the fp32 patches rounded). The feature bank
    (from ``cfg.bank_seed``) is shared by all runs."""
    bank = make_feature_bank(cfg, generator(cfg.bank_seed, "feature_bank"))
    data_seeds = seeds[:1] if cfg.share_across_runs else seeds
    splits = {"pretrain": (cfg.n_pretrain, cfg.mu_pretrain, True), "train": (cfg.n_train, cfg.mu_train, False),
              "test": (cfg.n_test, cfg.mu_test, False)}
    sets: dict[str, MultiViewData] = {}
    for name, (n, mu, pretraining) in splits.items():
        X = torch.empty(len(data_seeds), n, cfg.P, cfg.d, dtype=x_dtype)
        items = [sample(cfg, bank, n, mu, generator(s, name), pretraining, out=X[i]) for i, s in enumerate(data_seeds)]
        sets[name] = MultiViewData.stack(items, X=X)
    return TheoryData(bank=bank, **sets)
