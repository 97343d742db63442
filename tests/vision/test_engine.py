"""The vision engine's optimisation pieces: layer-decay parameter groups and the warmup-cosine schedule."""

from __future__ import annotations

import pytest

from mrplab.vision import engine
from mrplab.vision.models import build_encoder


def test_layer_decay_groups_and_schedule():
    enc = build_encoder("vit_micro", 16, 4, 3)
    groups = engine.param_groups(enc.layer_groups(), lr=1.0, weight_decay=0.05, layer_decay=0.5)
    n = len(enc.layer_groups())  # embed, 4 blocks, norm + head
    lrs = sorted({g["lr"] for g in groups})
    assert lrs == sorted(0.5 ** k for k in range(n))
    head = next(g for g in groups if any(p is enc.head.weight for p in g["params"]))
    assert head["lr"] == 1.0 and head["weight_decay"] == 0.05
    pos = next(g for g in groups if any(p is enc.vit.pos_embed for p in g["params"]))
    assert pos["lr"] == 0.5 ** (n - 1) and pos["weight_decay"] == 0.0  # embeddings and biases: no decay
    assert sum(len(g["params"]) for g in groups) == len(list(enc.parameters()))
    assert engine.warmup_cosine(0, 4, 20) == 0.25 and engine.warmup_cosine(3, 4, 20) == 1.0
    assert engine.warmup_cosine(4, 4, 20) == 1.0 and engine.warmup_cosine(20, 4, 20) == pytest.approx(0.0)
