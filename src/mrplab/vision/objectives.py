"""Mask-reconstruction objectives on images: pure functions, then the two pretrainers that apply them.

* MAE: predict the pixels of the masked patches (optionally each patch normalised to zero mean, unit variance).
* data2vec: predict, at the masked patches, an EMA teacher's features of the full image.

Masks are ``BoolTensor [B, N]``, ``True`` = masked (hidden from the student); N patches in row-major order.
Shapes: B images, N patches, P = p * p * 3 pixel values per patch, D feature channels.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from mrplab.errors import MrplabError
from mrplab.vision.models import Encoder, build_decoder, num_patches

# --------------------------------------------------------------------------- masks and patches


def patch_mask(B: int, N: int, ratio: float, generator: torch.Generator,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Exactly round(ratio * N) masked patches per row, uniformly at random -> bool [B, N], True = masked."""
    noise = torch.rand(B, N, generator=generator, device=generator.device)  # [B, N]
    hidden = noise.argsort(dim=1)[:, : round(ratio * N)]  # [B, n_mask] the patches with the smallest noise
    mask = torch.zeros(B, N, dtype=torch.bool, device=generator.device)
    return mask.scatter_(1, hidden, True).to(device)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, p * p * C], patches row-major, each patch's pixels (row, col, channel)."""
    B, C, H, W = x.shape
    h, w = H // p, W // p
    x = x.reshape(B, C, h, p, w, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(B, h * w, p * p * C)


def unpatchify(t: torch.Tensor, p: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """[B, N, p * p * C] -> [B, C, H, W] (inverse of ``patchify``)."""
    B = t.shape[0]
    h, w = grid
    x = t.reshape(B, h, w, p, p, channels)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(B, channels, h * p, w * p)


def masked_mean(err: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of per-patch errors err [B, N] over the masked patches only."""
    m = mask.to(err.dtype)
    return (err * m).sum() / m.sum().clamp_min(1.0)


def normalize_patches(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each patch to zero mean and unit variance over its pixels: [B, N, P] -> [B, N, P]."""
    mean = target.mean(-1, keepdim=True)
    var = target.var(-1, keepdim=True)
    return (target - mean) / (var + eps).sqrt()


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """Mean squared error of pred [B, N, P] against target patches [B, N, P], on masked patches only."""
    if norm_pix:
        target = normalize_patches(target)
    err = (pred.float() - target.float()).pow(2).mean(-1)  # [B, N]
    return masked_mean(err, mask)


def regression_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error of pred [B, N, D] against target features [B, N, D], on masked positions only."""
    err = (pred.float() - target.float()).pow(2).mean(-1)  # [B, N]
    return masked_mean(err, mask)


# --------------------------------------------------------------------------- data2vec targets and teacher


def d2v_target_vit(block_outputs: list[torch.Tensor]) -> torch.Tensor:
    """data2vec target: average of the teacher's top-k block outputs, each layer-normed: k x [B, N, D] -> [B, N, D]."""
    normed = [F.layer_norm(y.float(), y.shape[-1:]) for y in block_outputs]
    return torch.stack(normed).mean(0)


def d2v_target_cnn(fmap: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """data2vec target of a CNN: feature map [B, D, h', w'] pooled to the patch grid, layer-normed -> [B, N, D]."""
    g = F.adaptive_avg_pool2d(fmap.float(), grid).flatten(2).transpose(1, 2)  # [B, N, D]
    return F.layer_norm(g, g.shape[-1:])


def channel_var(t: torch.Tensor) -> torch.Tensor:
    """Variance of each channel across all rows, averaged over channels: [..., D] -> scalar.

    After a per-token layer norm every token has unit variance across its channels, so collapse
    (all tokens alike) shows only as vanishing variance of each channel across tokens."""
    flat = t.detach().float().reshape(-1, t.shape[-1])
    return flat.var(0).mean() if flat.shape[0] > 1 else flat.new_zeros(())


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, m: float) -> None:
    """teacher <- m * teacher + (1 - m) * student for parameters; buffers (BatchNorm statistics) are copied."""
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.lerp_(s.detach(), 1.0 - m)
    for t, s in zip(teacher.buffers(), student.buffers(), strict=True):
        t.copy_(s)


def momentum_at(step: int, total: int, start: float, end: float) -> float:
    """EMA momentum rising linearly from ``start`` at step 0 to ``end`` at step ``total``."""
    if total <= 0:
        return end
    return start + (end - start) * min(max(step / total, 0.0), 1.0)


class CollapseCheck:
    """Stops a data2vec run whose targets collapsed: the target variance below ``floor`` for ``patience``
    consecutive logged steps raises MrplabError."""

    def __init__(self, floor: float, patience: int):
        self.floor, self.patience, self.low = floor, patience, 0

    def update(self, target_var: float, step: int) -> None:
        self.low = self.low + 1 if target_var < self.floor else 0
        if self.low >= self.patience:
            raise MrplabError(
                f"data2vec targets collapsed: target variance {target_var:.3g} < {self.floor:g} for "
                f"{self.low} consecutive logs (step {step})",
                "lower pretrain.lr or raise pretrain.momentum; pretrain.min_target_var sets the floor",
            )

    def state_dict(self) -> dict:
        return {"low": self.low}

    def load_state_dict(self, state: dict) -> None:
        self.low = int(state["low"])


# --------------------------------------------------------------------------- pretrainers


class MAE(nn.Module):
    """Masked auto-encoder: the encoder sees the visible patches (ViT) or the image with masked patches zeroed
    (CNN); a light decoder predicts every patch's pixels; the loss counts the masked patches only."""

    def __init__(self, encoder: Encoder, mask_ratio: float, norm_pix: bool, decoder_dim: int, decoder_depth: int):
        super().__init__()
        self.encoder = encoder
        encoder.head.requires_grad_(False)  # unused while pretraining; fine-tuning resets it
        self.mask_ratio, self.norm_pix = mask_ratio, norm_pix
        p = encoder.patch_size
        self.decoder = build_decoder(encoder, out_dim=p * p * 3, dim=decoder_dim, depth=decoder_depth)

    def predict(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder.patch_tokens(self.encoder.features(x, mask)), mask)  # [B, N, P]

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pred = self.predict(x, mask)  # [B, N, P]
        loss = mae_loss(pred, patchify(x, self.encoder.patch_size), mask, self.norm_pix)
        return loss, {}


class Data2Vec(nn.Module):
    """data2vec: an EMA teacher encodes the full image; the student encodes the masked image and a light
    decoder (MAE's, ending in a linear regressor) predicts the teacher's targets at the masked patches."""

    def __init__(self, encoder: Encoder, mask_ratio: float, top_k: int, decoder_dim: int, decoder_depth: int):
        super().__init__()
        if encoder.kind == "vit" and not 1 <= top_k <= len(encoder.vit.blocks):
            raise MrplabError(
                f"pretrain.top_k = {top_k} but the encoder has {len(encoder.vit.blocks)} blocks",
                "choose pretrain.top_k between 1 and the depth",
            )
        self.encoder = encoder
        encoder.head.requires_grad_(False)  # unused while pretraining; fine-tuning resets it
        self.teacher = copy.deepcopy(encoder).requires_grad_(False)
        self.mask_ratio, self.top_k = mask_ratio, top_k
        self.decoder = build_decoder(encoder, out_dim=encoder.feature_dim, dim=decoder_dim, depth=decoder_depth)

    @torch.no_grad()
    def targets(self, x: torch.Tensor) -> torch.Tensor:
        if self.teacher.kind == "vit":
            return d2v_target_vit(self.teacher.block_outputs(x, self.top_k))  # [B, N, D]
        return d2v_target_cnn(self.teacher.features(x), self.teacher.grid)  # [B, N, D]

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        target = self.targets(x)  # [B, N, D]
        pred = self.decoder(self.encoder.patch_tokens(self.encoder.features(x, mask)), mask)  # [B, N, D]
        loss = regression_loss(pred, target, mask)
        return loss, {"target_var": channel_var(target[mask]), "pred_var": channel_var(pred[mask])}

    def update_teacher(self, m: float) -> None:
        ema_update(self.teacher, self.encoder, m)


Pretrainer = MAE | Data2Vec


def check_mask_ratio(encoder: Encoder, ratio: float) -> None:
    """A mask must hide at least one patch and leave at least one visible."""
    N = num_patches(encoder)
    k = round(ratio * N)
    if not 1 <= k < N:
        raise MrplabError(
            f"pretrain.mask_ratio = {ratio} masks {k} of {N} patches",
            f"choose a ratio that masks between 1 and {N - 1} patches",
        )
