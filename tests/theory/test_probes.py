"""Probes on planted weights: capture matrix, purity, noise memorisation, per-view accuracy, SL lottery."""

from __future__ import annotations

import math

import pytest
import torch

from mrplab.config import DataConfig
from mrplab.rng import generator
from mrplab.theory import net, probes
from mrplab.theory.data import FeatureBank, MultiViewData, make_feature_bank, sample


def _bank(k=3, L=2, d=16, seed=0) -> FeatureBank:
    c = DataConfig(k=k, L=L, d=d, P=8, C_p=2, features="orthonormal", coverage=1.0, extra_pretrain_classes=0)
    return make_feature_bank(c, generator(seed, "feature_bank"))


def _planted(bank: FeatureBank) -> torch.Tensor:
    V = bank.V  # [k, L, d]
    d = V.shape[-1]
    W = torch.zeros(1, d, 4)
    W[0, :, 0] = 2.0 * V[0, 0]
    W[0, :, 1] = 1.5 * V[1, 1] + 1.2 * V[2, 0]
    W[0, :, 2] = 0.5 * V[0, 1] + 0.9 * V[1, 0]  # below threshold everywhere
    W[0, :, 3] = -3.0 * V[2, 1]  # anti-correlated: not a capture
    return W


def test_capture_matrix_on_planted_weights():
    bank = _bank()
    W = _planted(bank)
    C = probes.capture_matrix(W, bank)
    assert C.shape == (1, 4, 3, 2)
    expected = torch.zeros(4, 3, 2)
    expected[0, 0, 0] = 2.0
    expected[1, 1, 1] = 1.5
    expected[1, 2, 0] = 1.2
    expected[2, 0, 1] = 0.5
    expected[2, 1, 0] = 0.9
    expected[3, 2, 1] = -3.0
    torch.testing.assert_close(C[0], expected, atol=1e-5, rtol=0)

    phi = probes.phi(C)
    assert phi.shape == (1, 3, 2)
    torch.testing.assert_close(phi[0], torch.tensor([[2.0, 0.5], [0.9, 1.5], [1.2, 0.0]]), atol=1e-5, rtol=0)

    cap = probes.captured(C, 1.0)
    assert cap.dtype == torch.bool
    assert cap[0].tolist() == [[True, False], [False, True], [True, False]]
    # the threshold is inclusive and a feature just under it is not captured
    assert probes.captured(C, 1.2 - 1e-4)[0, 2, 0] and not probes.captured(C, 1.2 + 1e-4)[0, 2, 0]

    purity = probes.kernel_purity(C, 1.0)
    assert purity.shape == (1, 4)
    assert purity[0].tolist() == [1, 2, 0, 0]
    assert probes.kernel_purity(C, 0.8)[0].tolist() == [1, 2, 1, 0]


def test_capture_matrix_batched_runs():
    bank = _bank(seed=1)
    W1 = _planted(bank)
    W = torch.cat([W1, 2 * W1, torch.zeros_like(W1)])  # [3, d, K]
    C = probes.capture_matrix(W, bank)
    torch.testing.assert_close(C[1], 2 * C[0], atol=1e-5, rtol=0)
    assert (C[2] == 0).all()
    assert probes.captured(C, 1.1).sum(dim=(1, 2)).tolist() == [3, 4, 0]


def test_noise_memorisation_matches_brute_force():
    c = DataConfig(k=3, L=2, d=24, P=6, C_p=2, gamma=0.05, sigma_p=0.2, features="orthonormal")
    bank = make_feature_bank(c, generator(0, "feature_bank"))
    R = 3
    for shared in (True, False):
        if shared:
            data = MultiViewData.stack([sample(c, bank, 40, 0.5, generator(1, "s"))])  # Rd = 1
        else:
            data = MultiViewData.stack([sample(c, bank, 40, 0.5, generator(s, "s")) for s in range(R)])
        W = net.init_kernels([generator(s, "init") for s in range(R)], c.d, 5, 0.3)
        Z = net.preact(data.X, W)
        C = probes.capture_matrix(W, bank)
        got = probes.noise_memorisation(Z, data, C)
        xi = data.noise(bank).expand(R, *data.X.shape[1:])  # [R, N, P, d]
        brute = torch.stack([(xi[r] @ W[r]).max() for r in range(R)])
        assert got.shape == (R,)
        torch.testing.assert_close(got, brute, atol=1e-4, rtol=0)
        # and it is not just the max of Z: the feature part was removed
        assert not torch.allclose(got, Z.flatten(1).amax(-1), atol=1e-3)
        # exactly max(Z - signal), also from the engine's bf16 Z in its own layout (shared: [N, P, R, K])
        signal = torch.matmul(data.coef.expand(R, *data.coef.shape[1:]).flatten(1, 2),
                              C.reshape(R, 5, -1).transpose(1, 2)).view_as(Z)
        assert torch.equal(got, (Z - signal).flatten(1).amax(-1))
        Xb = data.X.to(torch.bfloat16)
        Zb = net.preact(Xb, W, native=True)
        assert Zb.dtype == torch.bfloat16
        assert torch.equal(probes.noise_memorisation(Zb, data, C), probes.noise_memorisation(net.preact(Xb, W), data, C))


def _view_data(y, single):
    N = len(y)
    return MultiViewData(
        X=torch.zeros(1, N, 2, 3), y=torch.tensor([y]), single_view=torch.tensor([single]),
        dominant=torch.tensor([[0 if s else -1 for s in single]]), coef=torch.zeros(1, N, 2, 4),
        feature_patch=torch.full((1, N, 2), -1),
    )


def test_accuracy_by_view_hand_made():
    y = [0, 1, 2, 0, 1, 2]
    single = [False, False, False, True, True, True]
    data = _view_data(y, single)
    pred = torch.tensor([[0, 1, 0, 0, 2, 2],  # run 0: multi 2/3, single 2/3
                         [0, 1, 2, 1, 1, 1]])  # run 1: multi 3/3, single 1/3
    logits = torch.nn.functional.one_hot(pred, 3).float() * 5.0 - 1.0
    out = probes.accuracy_by_view(logits, data)
    torch.testing.assert_close(out["acc"], torch.tensor([4 / 6, 4 / 6]))
    torch.testing.assert_close(out["acc_multi"], torch.tensor([2 / 3, 1.0]))
    torch.testing.assert_close(out["acc_single"], torch.tensor([2 / 3, 1 / 3]))


def test_accuracy_by_view_empty_split_is_nan():
    data = _view_data([0, 1, 1], [False, False, False])
    logits = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])
    out = probes.accuracy_by_view(logits, data)
    assert out["acc"].item() == pytest.approx(2 / 3)
    assert out["acc_multi"].item() == pytest.approx(2 / 3)
    assert math.isnan(out["acc_single"].item())


def test_sl_lottery_planted():
    k, m, L, R = 3, 2, 2, 2
    K = k * m
    C0 = torch.zeros(R, K, k, L)
    C1 = torch.zeros(R, K, k, L)
    # run 0
    # class 0 (kernels 0, 1): init favours l=1 (kernel 1), SL ends with l=1 captured -> hit
    C0[0, 1, 0, 1] = 0.06
    C0[0, 0, 0, 0] = 0.04
    C1[0, 1, 0, 1] = 2.0
    C1[0, 0, 0, 0] = 0.3
    # class 1 (kernels 2, 3): init favours l=0, but l=1 wins -> miss
    C0[0, 2, 1, 0] = 0.05
    C0[0, 3, 1, 1] = 0.02
    C1[0, 3, 1, 1] = 1.4
    # a foreign kernel (class 0's kernel 0) correlating with class 1's l=0 must be ignored
    C0[0, 0, 1, 1] = 0.5
    C1[0, 0, 1, 0] = 9.0
    # class 2 (kernels 4, 5): captures both features (final argmax l=0), init favours l=0 -> hit
    C0[0, 5, 2, 0] = 0.07
    C0[0, 4, 2, 1] = 0.01
    C1[0, 5, 2, 0] = 1.8
    C1[0, 4, 2, 1] = 1.1
    # run 1: nothing captured anywhere except class 2, l=1, predicted l=1
    C0[1, 4, 2, 1] = 0.03
    C1[1, 4, 2, 1] = 1.0
    C1[1, 4, 2, 0] = 0.99
    out = probes.sl_lottery(C0, C1, k, m, thr=1.0)
    assert out["captured_per_class"].tolist() == [[1, 1, 2], [0, 0, 1]]
    assert out["winner"][0].tolist() == [1, 1, 0]
    assert out["winner"][1, 2].item() == 1
    assert out["predicted"][0].tolist() == [1, 0, 0]
    assert out["predicted"][1, 2].item() == 1
    torch.testing.assert_close(out["lottery_hit_rate"], torch.tensor([2 / 3, 1.0]))
    torch.testing.assert_close(out["final_phi"][0, 1], torch.tensor([0.0, 1.4]))  # foreign 9.0 ignored
    torch.testing.assert_close(out["init_phi"][0, 1], torch.tensor([0.05, 0.02]))  # foreign 0.5 ignored
    assert out["init_phi"].shape == (R, k, L) and out["final_phi"].shape == (R, k, L)


def test_sl_lottery_no_winner_is_nan_and_extra_classes_ignored():
    k, m, L = 2, 1, 2
    C0 = torch.zeros(1, 2, 3, L)  # k_total = 3: one extra pretraining class
    C1 = torch.zeros(1, 2, 3, L)
    C1[0, :, 2, :] = 5.0  # only the extra class is correlated
    out = probes.sl_lottery(C0, C1, k, m, thr=1.0)
    assert out["captured_per_class"].tolist() == [[0, 0]]
    assert math.isnan(out["lottery_hit_rate"].item())
