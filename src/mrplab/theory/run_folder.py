"""The run folder: everything one theory run leaves behind, written atomically.

    runs/<name>-<YYYYmmdd-HHMMSS>/
      config.yaml            the exact resolved config (config.dump_yaml)
      metrics.jsonl          one JSON object per logged record, in the order they arrived
      summary.json           config hash, seeds, capture threshold, per-seed metrics,
                             every verdict with its numbers, timings, wall time
      figures/*.png          capture heatmaps, Phi over training, per-view accuracy, losses
      report.md              verdicts, per-seed metrics, figures, timings, config
      checkpoints/
        sl.safetensors       W (SL from scratch)                   + sl.json
        mrp.safetensors      W, D (full MRP checkpoint)            + mrp.json
        ft.safetensors       W, H, b, center, scale (MRP -> FT)    + ft.json

The folder is built under a hidden name in the same parent
(``.<name>-<ts>.<pid>.partial``) and renamed to its final name only when every
file is written; on any exception the partial folder is removed. Each file
inside is written to a temp file and moved into place with ``os.replace``.
A hidden ``.partial`` folder can only be left by a process that was killed
outright (SIGKILL, power loss); it is safe to delete.

Every tensor's leading axis is the run axis: index r belongs to ``seeds[r]``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

import mrplab
from mrplab import config as config_mod
from mrplab import io
from mrplab.config import TheoryConfig
from mrplab.io import atomic_write_text, atomic_write_with, dumps
from mrplab.stats import fmt, md_table
from mrplab.theory import figures
from mrplab.theory import claims, experiment
from mrplab.theory.experiment import THRESHOLD_CURVE, TheoryResult, growth_drive

PHASES = ("sl", "mrp", *(f"mrp_{c}" for c in experiment.CONTROLS), "lp", "ft")  # the order experiment.run trains and logs them

# --------------------------------------------------------------------------- checkpoints


def write_checkpoints(result: TheoryResult, ckpt_dir: Path, provenance: dict[str, Any]) -> list[str]:
    """Three safetensors checkpoints, each with a JSON sidecar. Returns the file names."""
    from safetensors.torch import save_file

    cfg = result.cfg
    steps = experiment.planned_phase_steps(cfg)
    head = result.head
    kinds: dict[str, tuple[str, dict[str, torch.Tensor], dict[str, int]]] = {
        "sl": ("supervised learning from scratch: encoder kernels", {"W": result.W_sl}, {"sl": steps["sl"]}),
        "mrp": (
            "mask-reconstruction pretraining, full checkpoint: encoder kernels W and linear decoder D "
            "(W_<control>: the kernels of each control run, e.g. W_fitted_decoder)",
            {"W": result.W_mrp, "D": result.D_mrp, **{f"W_{c}": W for c, W in result.W_controls.items()}},
            {"mrp": steps["mrp"]},
        ),
        "ft": (
            "MRP -> fine-tuning: encoder kernels W and linear head (logits = ((h - center) / scale) H + b)",
            {"W": result.W_ft, "H": head.H, "b": head.b, "center": head.center, "scale": head.scale},
            {"mrp": steps["mrp"], "lp": steps["lp"], "ft": steps["ft"]},
        ),
    }
    names = []
    for kind, (what, tensors, kind_steps) in kinds.items():
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
        meta = {"kind": kind, "config_hash": provenance["config_hash"], "seeds": json.dumps(cfg.seeds)}
        atomic_write_with(ckpt_dir / f"{kind}.safetensors", lambda p, t=tensors, m=meta: save_file(t, str(p), metadata=m))
        sidecar = {
            "kind": kind,
            "what": what,
            "tensors": {k: list(v.shape) for k, v in tensors.items()},
            "run_axis": "leading axis of every tensor; index r is seeds[r]",
            "seeds": cfg.seeds,
            "step": sum(kind_steps.values()),
            "steps": kind_steps,
            **provenance,
        }
        atomic_write_text(ckpt_dir / f"{kind}.json", dumps(sidecar, indent=2) + "\n")
        names += [f"{kind}.safetensors", f"{kind}.json"]
    return names


# --------------------------------------------------------------------------- summary and report


def build_summary(
    result: TheoryResult, folder_name: str, wall_s: float | None, provenance: dict[str, Any]
) -> dict[str, Any]:
    cfg = result.cfg
    tally = claims.tally(result.verdicts)
    return {
        "name": cfg.name,
        "run_folder": folder_name,
        **provenance,
        "mrplab_version": mrplab.__version__,
        "torch_version": torch.__version__,
        "device": str(result.W_sl.device),
        "seeds": cfg.seeds,
        "capture_threshold": cfg.capture_threshold,
        "steps": experiment.planned_phase_steps(cfg),
        "claims_passed": tally["passed"],
        "claims_total": tally["total"],
        "claims_not_applicable": tally["not_applicable"],
        "claims_line": claims.tally_line(result.verdicts),
        "growth_drive": growth_drive(result.per_seed),
        "verdicts": result.verdicts,
        "per_seed": result.per_seed,
        "timings": result.timings,
        "runtime": result.runtime,
        "wall_s": wall_s,
    }


_CAPTIONS = {
    "capture.png": "Capture matrix C[r, (i, l)] = <w_r, v_{i,l}> of the final kernels (seed 0); "
    "squares mark C at or above the capture threshold.",
    "phi.png": "Phi_{i,l} = max_r <w_r, v_{i,l}> over training (seed 0), one line per feature; "
    "dashed: capture threshold.",
    "accuracy.png": "Test accuracy per view, mean ± std over seeds.",
    "loss.png": "Training loss per phase, mean over seeds.",
}


def render_report(summary: dict[str, Any], cfg: TheoryConfig, figure_files: list[str]) -> str:
    s = summary
    lines = [
        f"# mrplab theory run `{s['run_folder']}`",
        "",
        "Mask-reconstruction pretraining (MRP) followed by fine-tuning versus supervised learning (SL) from "
        "scratch on multi-view data.",
        "",
        f"- config hash: `{s['config_hash']}`",
        f"- seeds: {', '.join(str(x) for x in s['seeds'])}",
        f"- capture threshold (Phi counts as captured at or above): {fmt(s['capture_threshold'])}",
        f"- created: {s['created']}",
        f"- git commit: `{s['git_commit'] or 'n/a'}`",
        f"- command: `{s['command']}`",
        "",
    ]
    lines += _verdict_lines(s) + _drive_and_purity_lines(s) + _per_seed_lines(s["per_seed"])
    lines += ["", "## Figures", ""]
    for name in figure_files:
        lines += [f"![{name}](figures/{name})", "", _CAPTIONS.get(name, ""), ""]
    lines += _runtime_lines(s)
    lines += ["", "## Config", "", "The exact resolved config (also in `config.yaml`):", "", "```yaml",
              config_mod.dump_yaml(cfg).rstrip(), "```", ""]
    return "\n".join(lines)


def _verdict_lines(s: dict[str, Any]) -> list[str]:
    title = s.get("claims_line") or f"{s['claims_passed']} of {s['claims_total']} claims PASS"
    lines = [
        f"## Verdicts: {title}",
        "",
        "Each claim reads one metric per seed and aggregates it over seeds as its rule says. Rows marked "
        "*derived* re-read another claim's measurement and *consistency* rows check the pipeline; neither is "
        "counted above. N/A: nothing to judge (the reason is given), never a pass.",
        "",
    ]
    rows = []
    for v in s["verdicts"]:
        kind = v.get("kind", "claim")
        if kind == "derived":
            kind = f"derived from {v.get('derived_from')}"
        verdict = f"**{v['verdict']}**" + (f" ({v['reason']})" if v.get("reason") else "")
        rows.append((v["id"], v["statement"], kind, f"`{v['metric']}`", v["rule"], f"{fmt(v['mean'])} ± {fmt(v['std'])}",
                     fmt(v["min"]), ", ".join(fmt(x) for x in v["per_seed"]), verdict))
    return lines + md_table(("id", "claim", "kind", "metric", "rule", "mean ± std", "min", "per seed", "verdict"), rows)


def _drive_and_purity_lines(s: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    per_seed = s["per_seed"]
    if s.get("growth_drive"):
        lines += ["", "## Which drive grew MRP's features", "", s["growth_drive"], ""]
    if per_seed and "mrp_pure_kernels" in per_seed[0]:
        head = ["seed", "capturing kernels", "pure", "fused", "features held by a pure kernel"]
        head += [f"SL classes with exactly one feature at {f:g} x threshold" for f in THRESHOLD_CURVE]
        rows = [[m["seed"], m["mrp_kernels_capturing"], m["mrp_pure_kernels"], m["mrp_fused_kernels"],
                 fmt(m["mrp_features_held_by_pure_share"]),
                 *(fmt(m.get(f"sl_share_classes_one_feature_at_{f:g}x")) for f in THRESHOLD_CURVE)] for m in per_seed]
        lines += ["## Kernel purity and the capture threshold", "", *md_table(head, rows)]
        lines.append("")
    return lines


def _per_seed_lines(per_seed: list[dict]) -> list[str]:
    keys = [k for k in per_seed[0] if k != "seed"] if per_seed else []
    head = ["metric", *(f"seed {m['seed']}" for m in per_seed)]
    rows = [[f"`{k}`", *(fmt(m.get(k)) for m in per_seed)] for k in keys]
    return ["", "## Per-seed metrics", "", *md_table(head, rows)]


def _runtime_lines(s: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    rt = s.get("runtime") or {}
    if rt:
        rows = [(key, fmt(rt.get(key)), rt.get(key + "_reason", "")) for key in ("threads", "precision", "compile")]
        if rt.get("matmul_flops"):
            rows.append(("matmul FLOPs counted", f"{rt['matmul_flops'] / 1e12:.2f} TFLOP", ""))
        if rt.get("matmul_limit_gflops"):
            rows.append(("matmul limit at this precision and the run's shapes",
                         f"{rt['matmul_limit_gflops']:.0f} GFLOP/s", "measured or cached (runtime.py)"))
        lines += ["## Runtime", "", *md_table(("choice", "value", "why"), rows), ""]
    rows = [(k, fmt(v)) for k, v in s["timings"].items()]
    if s.get("wall_s") is not None:
        rows.append(("wall, start to end of training", fmt(s["wall_s"])))
    if s.get("wall_with_report_s") is not None:
        rows.append(("wall, including checkpoints and figures", fmt(s["wall_with_report_s"])))
    return lines + ["## Timings", "", *md_table(("phase", "seconds"), rows)]


# --------------------------------------------------------------------------- the folder


class RunFolder(io.RunFolder):
    """A theory run folder under construction; a context manager that cleans up on failure.

    >>> with RunFolder("runs", cfg) as rf:
    ...     result = experiment.run(cfg, emit=rf.emit)
    ...     path = rf.finish(result)
    """

    def finish(self, result: TheoryResult, wall_s: float | None = None) -> Path:
        """Write summary, checkpoints, figures and report, then move the folder into place."""
        if wall_s is None:
            wall_s = time.perf_counter() - self._t0
        self.close_metrics()
        write_checkpoints(result, self.partial / "checkpoints", self.provenance)
        figure_files = figures.write_all(result, self.partial / "figures")
        t_written = time.perf_counter() - self._t0
        summary = build_summary(result, self.name, wall_s, self.provenance)
        summary["wall_with_report_s"] = t_written
        atomic_write_text(self.partial / "report.md", render_report(summary, result.cfg, figure_files))
        atomic_write_text(self.partial / "summary.json", dumps(summary, indent=2) + "\n")
        self.final = self.rename_into_place()
        return self.final


def run_theory(
    cfg: TheoryConfig,
    out_dir: str | Path = "runs",
    on_record: Callable[[dict], None] | None = None,
    advance: Callable[[int], None] | None = None,
    command: str | None = None,
    on_runtime: Callable[[dict], None] | None = None,
) -> tuple[TheoryResult, Path]:
    """Run one theory experiment and write its run folder; what ``mrplab theory`` calls.

    ``on_record`` sees every logged record after it is written to metrics.jsonl;
    ``advance(n)`` is called for every n optimisation steps done.
    """
    t0 = time.perf_counter()
    with RunFolder(out_dir, cfg, command=command) as rf:

        def emit(rec: dict) -> None:
            rf.emit(rec)
            if on_record is not None:
                on_record(rec)

        result = experiment.run(cfg, emit, advance or (lambda n: None), on_runtime or (lambda info: None))
        path = rf.finish(result, wall_s=time.perf_counter() - t0)
    return result, path


def write_run(
    result: TheoryResult, out_dir: str | Path = "runs", wall_s: float | None = None, command: str | None = None
) -> Path:
    """Write the run folder of a result computed elsewhere (metrics come from ``result.history``)."""
    with RunFolder(out_dir, result.cfg, command=command) as rf:
        for phase in [*PHASES, *(p for p in result.history if p not in PHASES)]:
            for rec in result.history.get(phase, []):
                rf.emit(rec)
        return rf.finish(result, wall_s=wall_s if wall_s is not None else result.timings.get("total_s"))
