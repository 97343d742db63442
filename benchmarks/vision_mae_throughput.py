"""Images/s of one MAE ViT pretraining step: mrplab versus lightly, same ViT, same batch, fp32 and bf16.

One step = forward (encoder on the visible patches, light decoder, MSE on the masked patches) +
backward + AdamW step. Both sides wrap the same timm VisionTransformer configuration (no class
token, so the masks are identical in kind: exactly round(ratio * N) patches per image) and the
same one-block decoder; mrplab's MAE runs with norm_pix off, like lightly's reference example.
Single timed steps alternate between the sides (the order reversed every round) and each side's median
step time is reported, so load from other processes hits both alike. mrplab runs as its trainer does
(``choose_attention``: with bf16 on CPU the explicit attention path instead of timm's fused kernel, whose
bf16 backward is slow on CPU); lightly runs as its examples do, on timm's defaults. Prints a table and
writes benchmarks/results/vision_mae_throughput.json with the ratios mrplab / lightly.

lightly is only needed here (``pip install lightly`` into the venv); it is not a dependency of mrplab.

    .venv/bin/python benchmarks/vision_mae_throughput.py                 # vit_tiny, 32 px, patch 4, batch 64
    .venv/bin/python benchmarks/vision_mae_throughput.py --model vit_micro --batch 128
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from mrplab.io import atomic_write_text
from mrplab.vision.models import VIT_SIZES, build_encoder, choose_attention
from mrplab.vision.objectives import MAE, patch_mask

RESULTS = Path(__file__).resolve().parent / "results" / "vision_mae_throughput.json"


class LightlyMAE(nn.Module):
    """lightly's MAE example (examples/pytorch/mae.py) on a timm ViT without a class token."""

    def __init__(self, vit, decoder_dim: int, decoder_heads: int, mask_ratio: float):
        super().__init__()
        from lightly.models import utils
        from lightly.models.modules import MAEDecoderTIMM, MaskedVisionTransformerTIMM

        self.utils = utils
        self.mask_ratio = mask_ratio
        self.patch_size = vit.patch_embed.patch_size[0]
        self.backbone = MaskedVisionTransformerTIMM(vit=vit)
        self.sequence_length = self.backbone.sequence_length
        self.decoder = MAEDecoderTIMM(
            num_patches=vit.patch_embed.num_patches, patch_size=self.patch_size, embed_dim=vit.embed_dim,
            decoder_embed_dim=decoder_dim, decoder_depth=1, decoder_num_heads=decoder_heads, mlp_ratio=4.0,
            num_prefix_tokens=0,
        )
        self.criterion = nn.MSELoss()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        u = self.utils
        B = images.shape[0]
        idx_keep, idx_mask = u.random_token_mask(size=(B, self.sequence_length), mask_ratio=self.mask_ratio,
                                                 mask_class_token=True, device=images.device)
        x_encoded = self.backbone.encode(images=images, idx_keep=idx_keep)
        x_decode = self.decoder.embed(x_encoded)
        x_masked = u.repeat_token(self.decoder.mask_token, (B, self.sequence_length))
        x_masked = u.set_at_index(x_masked, idx_keep, x_decode.type_as(x_masked))
        x_decoded = self.decoder.decode(x_masked)
        x_pred = self.decoder.predict(u.get_at_index(x_decoded, idx_mask))
        target = u.get_at_index(u.patchify(images, self.patch_size), idx_mask)
        return self.criterion(x_pred.float(), target)


class Stepper:
    """One model's training step (forward + backward + AdamW), timed one step at a time."""

    def __init__(self, model: nn.Module, loss_fn, x: torch.Tensor, precision: str):
        self.loss_fn, self.x, self.precision = loss_fn, x, precision
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        self.times: list[float] = []

    def step(self) -> float:
        sync = torch.cuda.synchronize if self.x.device.type == "cuda" else (lambda: None)
        sync()
        t = time.perf_counter()
        with torch.autocast(self.x.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            loss = self.loss_fn()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        sync()
        return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_tiny", choices=sorted(VIT_SIZES))
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--patch", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--mask-ratio", type=float, default=0.75)
    ap.add_argument("--decoder-dim", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per side and precision")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    try:
        import lightly
    except ImportError:
        sys.exit("this benchmark needs lightly: .venv/bin/pip install lightly (not a dependency of mrplab)")

    device = torch.device(args.device)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size,
                    generator=torch.Generator().manual_seed(0)).to(device)
    N = (args.image_size // args.patch) ** 2
    gen = torch.Generator().manual_seed(0)
    heads = max(1, args.decoder_dim // 32)

    def ours(precision: str):
        torch.manual_seed(0)
        enc = build_encoder(args.model, args.image_size, args.patch, 10)
        mae = MAE(enc, args.mask_ratio, norm_pix=False, decoder_dim=args.decoder_dim, decoder_depth=1).to(device)
        choose_attention(mae, device, precision)  # as vision/train.py's fit() does
        return mae, lambda: mae(x, patch_mask(args.batch, N, args.mask_ratio, gen, device))[0]

    def theirs():
        torch.manual_seed(0)
        vit = build_encoder(args.model, args.image_size, args.patch, 10).vit  # the identical timm ViT
        mae = LightlyMAE(vit, args.decoder_dim, heads, args.mask_ratio).to(device)
        return mae, lambda: mae(x)

    table = {}
    for precision in ("fp32", "bf16"):
        makers = (("mrplab", lambda: ours(precision)), ("lightly", theirs))
        steppers = {name: Stepper(*make(), x, precision) for name, make in makers}
        for s in steppers.values():  # warm-up, untimed
            for _ in range(3):
                s.step()
        names = list(steppers)
        for r in range(args.steps):  # alternate single steps so that load from other processes hits all alike
            for name in (names if r % 2 == 0 else names[::-1]):
                steppers[name].times.append(steppers[name].step())
        speed = {k: args.batch / statistics.median(s.times) for k, s in steppers.items()}
        table[precision] = {"mrplab_images_per_s": speed["mrplab"], "lightly_images_per_s": speed["lightly"],
                            "ratio": speed["mrplab"] / speed["lightly"],
                            "step_seconds": {k: s.times for k, s in steppers.items()}}
        print(f"{precision}: mrplab {speed['mrplab']:8.1f} img/s   lightly {speed['lightly']:8.1f} img/s   "
              f"ratio {speed['mrplab'] / speed['lightly']:.2f}", flush=True)

    dim, depth, vit_heads, mlp = VIT_SIZES[args.model]
    record = {
        "what": "images/s of one MAE pretraining step (forward + backward + AdamW), batch / median step time",
        "config": {**vars(args), "embed_dim": dim, "depth": depth, "heads": vit_heads, "mlp_ratio": mlp,
                   "num_patches": N, "decoder_heads": heads, "decoder_depth": 1},
        "fp32": table["fp32"],
        "bf16": table["bf16"],
        "ratio_fp32": table["fp32"]["ratio"],
        "ratio_bf16": table["bf16"]["ratio"],

        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "lightly": lightly.__version__,
                    "load_average": os.getloadavg(),
                    "cuda": torch.cuda.get_device_name() if device.type == "cuda" else None},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS, json.dumps(record, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
