"""Encoders (ViT and ResNet, from timm) behind one contract, and the light MRP decoders.

The contract every encoder keeps (what the objectives and the engine call):

* ``kind``          "vit" or "cnn"
* ``grid``          (h, w): the patch grid the mask lives on, ``image_size // patch_size``
* ``patch_size``    pixels per patch side
* ``feature_dim``   channels of ``features`` (ViT tokens, CNN feature map)
* ``features(x, mask=None)``
      ViT: tokens ``[B, n + N, D]`` (n prefix tokens: 0 for mrplab's ViTs, a timm model's class / register
      tokens); with a mask only the visible patch tokens ``[B, n + N_vis, D]`` (MAE style).
      CNN: masked patches are zeroed at the input, feature map ``[B, D, h', w']``.
* ``patch_tokens(f)`` ViT: ``f`` without its prefix tokens ``[B, N(_vis), D]``; CNN: ``f``
* ``pool(f)``       ``[B, D]`` the model's pooling of ``features`` (a global average for mrplab's encoders; a
                    timm ViT's own: class token or average, then its fc_norm); ``head(pool(f))`` are the logits
* ``forward(x)``    logits ``[B, num_classes]``
* ``head``, ``head_prefix``  the classifier and its state_dict key prefix; ``reset_head(num_classes)``
* ``layer_groups()`` parameter groups from input to output, for layer-wise lr decay

Masks are ``BoolTensor [B, N]`` with ``True`` = masked, N = h * w in row-major order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import build_sincos2d_pos_embed
from timm.models.resnet import BasicBlock, ResNet
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from mrplab.errors import MrplabError

# name -> (embed_dim, depth, heads, mlp_ratio)
VIT_SIZES = {
    "vit_tiny": (192, 12, 3, 4.0),
    "vit_micro": (96, 4, 3, 2.0),
}
# name -> (blocks per stage, channels per stage)
RESNET_SIZES = {
    "resnet18": ((2, 2, 2, 2), (64, 128, 256, 512)),
    "resnet_small": ((1, 1, 1, 1), (32, 64, 128, 256)),
}
ENCODER_NAMES = (*VIT_SIZES, *RESNET_SIZES)


Group = list[tuple[str, nn.Parameter]]


def _named(module: nn.Module, prefix: str) -> Group:
    return [(f"{prefix}.{n}", p) for n, p in module.named_parameters()]


# --------------------------------------------------------------------------- ViT


class _EncoderBase(nn.Module):
    """What both encoders share: logits = head(pool(features(x)))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))  # [B, C]


class ViTEncoder(_EncoderBase):
    """timm VisionTransformer; encodes visible tokens only when masked. mrplab's own sizes (``build_encoder``)
    have no class token and average-pool (``sized``); any other timm ViT keeps its own prefix tokens and pooling
    (``model.timm``: the architectures of published checkpoints)."""

    kind = "vit"
    head_prefix = "vit.head."

    def __init__(self, vit: VisionTransformer, own_pool: bool):
        """``own_pool`` False: mrplab's ViT (no prefix tokens; positions added and tokens averaged directly, the
        code path its recorded runs took); True: a timm ViT's own prefix tokens, positions, pooling, fc_norm."""
        super().__init__()
        self.vit = vit
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.grid = tuple(int(g) for g in vit.patch_embed.grid_size)
        self.feature_dim = int(vit.embed_dim)
        self.prefix = int(vit.num_prefix_tokens)
        self.own_pool = own_pool

    @classmethod
    def sized(cls, image_size: int, patch_size: int, num_classes: int, dim: int, depth: int, heads: int,
              mlp_ratio: float) -> "ViTEncoder":
        """mrplab's ViT of these sizes: no class token, average pooling, no fc_norm."""
        return cls(VisionTransformer(
            img_size=image_size, patch_size=patch_size, num_classes=num_classes, embed_dim=dim, depth=depth,
            num_heads=heads, mlp_ratio=mlp_ratio, class_token=False, global_pool="avg", fc_norm=False,
        ), own_pool=False)

    def features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        v, n = self.vit, self.prefix
        if self.own_pool:
            t = v.norm_pre(v._pos_embed(v.patch_embed(x)))  # [B, n + N, D]: timm's own prefix tokens and positions
        else:
            t = v.patch_embed(x) + v.pos_embed  # [B, N, D]
        if mask is not None:
            B, _, D = t.shape
            visible = t[:, n:][~mask].reshape(B, -1, D)  # [B, N_vis, D], row-major order of the visible patches
            t = torch.cat([t[:, :n], visible], 1) if n else visible
        return v.norm(v.blocks(t))

    def patch_tokens(self, f: torch.Tensor) -> torch.Tensor:
        return f[:, self.prefix:] if self.prefix else f  # [B, N(_vis), D]

    def block_outputs(self, x: torch.Tensor, top_k: int) -> list[torch.Tensor]:
        """Outputs of the last ``top_k`` blocks on the full image: top_k x [B, N, D] (data2vec targets)."""
        return self.vit.forward_intermediates(
            x, indices=top_k, output_fmt="NLC", intermediates_only=True, stop_early=True
        )

    def pool(self, f: torch.Tensor) -> torch.Tensor:
        if self.own_pool:
            return self.vit.fc_norm(self.vit.pool(f))  # [B, D]: class token or average, as the timm model pools
        return f.mean(1)  # [B, D]

    @property
    def head(self) -> nn.Module:
        return self.vit.head

    def reset_head(self, num_classes: int) -> None:
        self.vit.reset_classifier(num_classes)

    def layer_groups(self) -> list[Group]:
        v = self.vit
        embed = [(f"vit.{n}", p) for n in ("pos_embed", "cls_token", "reg_token") if (p := getattr(v, n, None)) is not None]
        embed = embed[:1] + _named(v.patch_embed, "vit.patch_embed") + embed[1:]
        blocks = [_named(b, f"vit.blocks.{i}") for i, b in enumerate(v.blocks)]
        top = _named(v.norm, "vit.norm") + _named(v.fc_norm, "vit.fc_norm") + _named(v.head, "vit.head")
        grouped = {id(p) for g in (embed, *blocks, top) for _, p in g}
        rest = [(f"vit.{n}", p) for n, p in v.named_parameters() if id(p) not in grouped]  # e.g. an attention pool
        return [embed, *blocks, top + rest]


# --------------------------------------------------------------------------- CNN


STEMS = ("small", "timm")


class CNNEncoder(_EncoderBase):
    """timm ResNet; masked patches (``patch_size`` pixels) are zeroed at the input."""

    kind = "cnn"
    head_prefix = "net.fc."

    def __init__(self, net: ResNet, image_size: int, patch_size: int):
        super().__init__()
        self.net = net
        self.patch_size = patch_size
        self.grid = (image_size // patch_size, image_size // patch_size)
        self.feature_dim = net.num_features

    @classmethod
    def sized(cls, image_size: int, patch_size: int, num_classes: int, layers: tuple[int, ...],
              channels: tuple[int, ...], stem: str = "small") -> "CNNEncoder":
        """mrplab's BasicBlock ResNet of these sizes. ``stem`` small (for small images): a 3x3 stride-1 conv and
        no max-pool; timm: timm's own 7x7 stride-2 conv and max-pool, so the network is exactly timm's
        (what ``mrplab vision export`` needs)."""
        net = ResNet(BasicBlock, layers=layers, channels=channels, num_classes=num_classes)
        if stem == "small":
            net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        return cls(net, image_size, patch_size)

    def features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            keep = (~mask).view(-1, 1, *self.grid).to(x.dtype)  # [B, 1, h, w]
            p = self.patch_size
            x = x * keep.repeat_interleave(p, 2).repeat_interleave(p, 3)  # [B, 3, H, W], masked patches = 0
        return self.net.forward_features(x)  # [B, D, h', w']

    def patch_tokens(self, f: torch.Tensor) -> torch.Tensor:
        return f  # a feature map has no prefix tokens

    def pool(self, f: torch.Tensor) -> torch.Tensor:
        return f.mean((2, 3))  # [B, D]

    @property
    def head(self) -> nn.Module:
        return self.net.fc

    def reset_head(self, num_classes: int) -> None:
        self.net.reset_classifier(num_classes)

    def layer_groups(self) -> list[Group]:
        n = self.net
        stem = _named(n.conv1, "net.conv1") + _named(n.bn1, "net.bn1")
        stages = [_named(getattr(n, f"layer{i}"), f"net.layer{i}") for i in range(1, 5)]
        return [stem, *stages, _named(n.fc, "net.fc")]


Encoder = ViTEncoder | CNNEncoder


def encoder_sizes(name: str, image_size: int, patch_size: int, stem: str = "small", timm_name: str | None = None
                  ) -> dict[str, float]:
    """What the memory estimate and the precision probe need, without building weights (a timm architecture
    is built on the meta device): ViT {"dim", "depth", "mlp_ratio", "tokens"}; CNN {"width" (first stage's
    channels), "side" (the first stage's map side)}; both "params" (the encoder's parameter count)."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        enc = build_encoder(name, image_size, patch_size, 0, stem, timm_name)
    params = float(sum(p.numel() for p in enc.parameters()))
    if isinstance(enc, ViTEncoder):
        return {"dim": enc.feature_dim, "depth": len(enc.vit.blocks), "tokens": enc.grid[0] * enc.grid[1] + enc.prefix,
                "mlp_ratio": enc.vit.blocks[0].mlp.fc1.out_features / enc.feature_dim, "params": params}
    side = image_size if timm_name is None and stem == "small" else max(1, image_size // 4)
    return {"width": float(enc.net.layer1[0].conv1.out_channels), "side": float(side), "params": params}


def matmul_shapes(sizes: dict[str, float], batch: int) -> list[tuple[int, int, int]]:
    """The encoder's typical matmul (m, k, n) at this batch (``encoder_sizes``), for the precision probe
    (runtime.py): a ViT's MLP layer over all tokens, or a ResNet's first-stage 3x3 conv as im2col."""
    if "dim" in sizes:
        dim = int(sizes["dim"])
        return [(batch * int(sizes["tokens"]), dim, int(dim * sizes["mlp_ratio"]))]
    c, side = int(sizes["width"]), int(sizes["side"])
    return [(batch * side ** 2, 9 * c, c)]


TIMM_MODULES = ("vision_transformer", "resnet")  # timm architectures an encoder can be (model.timm)


def timm_family(timm_name: str) -> str:
    """"vit" or "cnn" for a registered timm architecture mrplab can use as an encoder; one error line otherwise."""
    from timm.models import is_model, is_model_in_modules

    if not is_model(timm_name):
        raise MrplabError(f"timm has no model {timm_name}", "see timm.list_models(), e.g. vit_base_patch16_224")
    if is_model_in_modules(timm_name, ["vision_transformer"]):
        return "vit"
    if is_model_in_modules(timm_name, ["resnet"]):
        return "cnn"
    raise MrplabError(f"timm's {timm_name} is neither a VisionTransformer nor a ResNet",
                      f"model.timm takes architectures of timm.models.{' or timm.models.'.join(TIMM_MODULES)}")


def build_timm_encoder(timm_name: str, image_size: int, patch_size: int, num_classes: int) -> Encoder:
    """A registered timm ViT (its own class token, pooling, patch size; positions for ``image_size``) or ResNet
    (as timm builds it; masks of ``patch_size``) as an encoder, randomly initialised."""
    import timm

    family = timm_family(timm_name)
    if family == "vit":
        vit = timm.create_model(timm_name, pretrained=False, num_classes=num_classes, img_size=image_size)
        own = int(vit.patch_embed.patch_size[0])
        if own != patch_size:
            raise MrplabError(f"timm's {timm_name} has {own}-px patches, model.patch_size is {patch_size}",
                              f"set model.patch_size={own} (and a data.image_size it divides)")
        return ViTEncoder(vit, own_pool=True)
    return CNNEncoder(timm.create_model(timm_name, pretrained=False, num_classes=num_classes), image_size, patch_size)


def build_encoder(name: str, image_size: int, patch_size: int, num_classes: int, stem: str = "small",
                  timm_name: str | None = None) -> Encoder:
    """An encoder by name: vit_tiny, vit_micro, resnet18, resnet_small (``stem``: CNNEncoder's), or the timm
    architecture ``timm_name`` when given. Initialised from torch's global RNG (callers that need
    reproducibility build it under ``torch.random.fork_rng``)."""
    if timm_name is None and name not in ENCODER_NAMES:
        raise MrplabError(f"unknown model name '{name}'", f"use one of {', '.join(ENCODER_NAMES)}")
    if stem not in STEMS:
        raise MrplabError(f"unknown stem '{stem}'", f"use one of {', '.join(STEMS)}")
    if patch_size < 1 or image_size % patch_size:
        raise MrplabError(
            f"image size {image_size} is not divisible by patch size {patch_size}",
            "choose model.patch_size that divides data.image_size",
        )
    if timm_name is not None:
        return build_timm_encoder(timm_name, image_size, patch_size, num_classes)
    if name in VIT_SIZES:
        dim, depth, heads, mlp = VIT_SIZES[name]
        return ViTEncoder.sized(image_size, patch_size, num_classes, dim, depth, heads, mlp)
    layers, channels = RESNET_SIZES[name]
    return CNNEncoder.sized(image_size, patch_size, num_classes, layers, channels, stem)


# --------------------------------------------------------------------------- decoders


class ViTDecoder(nn.Module):
    """MAE's light decoder: visible tokens + mask tokens at the masked places, fixed 2-D sin-cos positions,
    a few transformer blocks, a linear prediction per patch."""

    def __init__(self, grid: tuple[int, int], enc_dim: int, dim: int, depth: int, heads: int, out_dim: int):
        super().__init__()
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.mask_token, std=0.02)
        pos = build_sincos2d_pos_embed(list(grid), dim=dim).reshape(1, grid[0] * grid[1], dim)  # [1, N, d]
        self.register_buffer("pos_embed", pos, persistent=False)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, out_dim)

    def forward(self, visible: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        v = self.embed(visible)  # [B, N_vis, d]
        B, N = mask.shape
        t = self.mask_token.to(v.dtype).expand(B, N, -1).masked_scatter((~mask).unsqueeze(-1), v)  # [B, N, d]
        t = self.blocks(t + self.pos_embed)
        return self.pred(self.norm(t))  # [B, N, out_dim]


class ConvDecoder(nn.Module):
    """Light conv decoder: feature map -> patch grid -> 1x1, 3x3, 1x1 convs -> one prediction per patch."""

    def __init__(self, grid: tuple[int, int], enc_dim: int, dim: int, out_dim: int):
        super().__init__()
        self.grid = grid
        self.net = nn.Sequential(
            nn.Conv2d(enc_dim, dim, 1), nn.BatchNorm2d(dim), nn.GELU(),
            nn.Conv2d(dim, dim, 3, padding=1), nn.BatchNorm2d(dim), nn.GELU(),
            nn.Conv2d(dim, out_dim, 1),
        )

    def forward(self, fmap: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        g = F.adaptive_avg_pool2d(fmap, self.grid)  # [B, D, h, w]
        return self.net(g).flatten(2).transpose(1, 2)  # [B, N, out_dim]


def build_decoder(encoder: Encoder, out_dim: int, dim: int, depth: int) -> ViTDecoder | ConvDecoder:
    """The decoder that fits ``encoder``: ``decoder(features(x, mask), mask) -> [B, N, out_dim]``."""
    if encoder.kind == "vit":
        heads = max(1, dim // 32) if dim % 32 == 0 else 1
        return ViTDecoder(encoder.grid, encoder.feature_dim, dim, depth, heads, out_dim)
    return ConvDecoder(encoder.grid, encoder.feature_dim, dim, out_dim)


def num_patches(encoder: Encoder) -> int:
    return math.prod(encoder.grid)


# --------------------------------------------------------------------------- attention kernel


def choose_attention(module: nn.Module, device: torch.device, precision: str) -> int:
    """Pick each timm attention layer's kernel for the run: with bf16 autocast on CPU the explicit
    softmax(q k^T) v path, elsewhere timm's fused scaled_dot_product_attention. Returns how many layers.

    Measured on a 2-core AVX-512-BF16 CPU (vit_tiny MAE step, batch 64): the CPU flash-attention kernel's
    backward in bf16 takes ~7x its fp32 time and a third of the step; the explicit path makes the bf16
    step 1.4x faster, in fp32 the two are equal (benchmarks/vision_mae_throughput.py). Same function either
    way; only the kernel differs.
    """
    fused = not (device.type == "cpu" and precision == "bf16")
    layers = [m for m in module.modules() if hasattr(m, "fused_attn")]
    for m in layers:
        m.fused_attn = fused
    return len(layers)
