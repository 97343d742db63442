"""One training step: per-run losses and their hand-derived gradients, no autograd graph.

Each function returns the per-run loss [R] and the gradients of the summed
loss. The math follows net.py and objectives.py exactly; tests check every
gradient against autograd through those reference functions.

Cost per step: one matmul Z = X W (teacher and student share it when the
teacher is the stop-gradient student), one pass over Z that pools the smoothed
ReLU over the (visible and all) patches, a few [R, N, K] ops for the loss, one
pass over Z that writes dZ = act'(Z) * keep * dh in the matmul's dtype, and one
matmul dW = X^T dZ (mask reconstruction on the CPU, or on data shared by several
runs: over the visible patches only, ``Visible``). The two passes are ``PatchOps`` (fused
where it pays: C++ kernels on the CPU, native.py; torch.compile on CUDA); the activation is
recomputed from Z rather than stored, so a step holds Z and dZ only.
"""

from __future__ import annotations

import functools
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from mrplab import runtime
from mrplab.theory import native, net, objectives, probes

def _wide(Z: torch.Tensor) -> torch.Tensor:
    """Z in the dtype the elementwise work runs in: fp32 for bf16 matmul outputs, else Z's own."""
    return Z.to(torch.promote_types(Z.dtype, torch.float32))


def pool_patches(Z: torch.Tensor, keep: torch.Tensor | None, q: int, thr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over patches of act(Z): (over the visible patches, over all patches), each [R, N, K].

    Z [R, N, P, K] in the matmul's dtype and layout (any strides); keep [R, N, P] bool (True = visible)
    or None (every patch visible: both sums are the same tensor). Computed in fp32. Written as
    net.smoothed_relu in the form the compiler vectorises best (products with the mask, no selects).
    """
    z = _wide(Z)
    u = z.clamp(0.0, thr) * (1.0 / thr)  # z/thr on the polynomial piece, 1 above, 0 below
    a = (z - thr).clamp(min=0.0) + (thr / q) * u**q  # linear part + z^q/(q thr^(q-1))
    h_all = a.sum(2)
    if keep is None:
        return h_all, h_all
    return (a * keep.unsqueeze(-1)).sum(2), h_all


def patch_grad(Z: torch.Tensor, keep: torch.Tensor | None, dh: torch.Tensor, q: int, thr: float,
               out: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """dZ = act'(Z) * dh (the same for every patch) on the visible patches, 0 on the others, in Z's dtype
    and layout, ready for the weight-gradient matmul; or written into ``out`` (Z's shape, any strides: a slice
    of a larger buffer) and returned; or, with ``rows``, only the visible patches' rows, into a compacted
    ``out`` (``_into_rows``). dh [R, N, K]. act'(z) = (clamp(z, 0, thr)/thr)^(q-1) (q >= 2, config.NetConfig)."""
    g = (_wide(Z).clamp(0.0, thr) * (1.0 / thr)) ** (q - 1) * dh.unsqueeze(2)
    if keep is not None and rows is None:
        g = g * keep.unsqueeze(-1)
    return _into(g, Z, out, rows)


def _into(g: torch.Tensor, Z: torch.Tensor, out: torch.Tensor | None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """dZ ``g`` in Z's dtype and layout (shared data: whatever the inputs' layouts made of g), or copied
    into ``out``, or its visible rows into the compacted ``out`` (``_into_rows``)."""
    if rows is not None:
        return _into_rows(g, rows, out)
    if out is not None:
        return out.copy_(g)
    if g.dtype == Z.dtype and g.stride() == Z.stride():
        return g
    return g.to(Z.dtype) if Z.is_contiguous() else torch.empty_like(Z).copy_(g)


def _into_rows(g: torch.Tensor, rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """g [R, N, P, K]'s rows where rows [R, N, P] >= 0 written at those element offsets of the contiguous
    ``out`` (``Visible.rows``: a compacted dZ of the visible patches), in out's dtype; the others are skipped."""
    sel = rows >= 0
    at = rows[sel].unsqueeze(1) + torch.arange(g.shape[-1], device=g.device)
    out.view(-1)[at] = g[sel].to(out.dtype)
    return out


VISIBLE_ROWS_STEP = 256  # a run's visible patches, rounded up to a multiple of this: its product's rows


@dataclass
class Visible:
    """The visible patches of a chunk of c runs, for mask reconstruction's weight gradient over them only.

    A masked patch's dZ is 0 (only visible patches reach the student's output), so X^T dZ over every patch
    multiplies zeros in a fraction mask_ratio of its rows. Instead, the grad pass writes only the visible
    patches' rows of dZ, run after run, into one compacted buffer (``rows``), and each run's weight gradient
    is A_r^T-times-its-rows, where A holds the run's visible patches: the columns of the transposed patches
    packed by the fused kernels (native.compact16: [d, total], the layout the bf16 product runs fastest from)
    or the rows of X gathered ([total, d], read transposed). A run's rows are its visible patches rounded up
    to VISIBLE_ROWS_STEP with zero rows (and zero patches): a product whose inner size changed at every step
    with the mask's draw made the BLAS's scratch buffers change size too, which fragmented the heap (200
    shared R = 8 steps: resident memory 0.69 -> 1.43 GB, 19.1 s vs 16.4 s for the product over every patch;
    with the size fixed 0.77 GB, 14.0 s). The same sum as over every patch (the dropped and added terms are
    exact zeros), in a blocking of its own: it rounds like the dense product, not bitwise as it.
    ``visible_patches`` builds it once per step and run chunk; the variants of a step share it (with per-run
    data, ``mrp_variants`` writes a run's variants side by side in one row: ``rows(width, parts)``). The packed
    patches take c * N * P * d elements, held from step to step (``_workspace``): for one chunk at a time,
    within the step temporaries experiment.memory_parts plans for.
    """

    counts: list[int]  # visible patches per run
    widths: list[int]  # rows of each run's product: its count rounded up to VISIBLE_ROWS_STEP, at most N * P
    starts: list[int]  # each run's first row in the compacted buffers
    rank: torch.Tensor  # [c, N, P] int64: the patch's row in the compacted buffers, -1 where masked
    A: torch.Tensor  # the visible patches: [d, total] (columns) or [total, d] (rows)
    columns: bool  # A's layout
    _rows: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False)  # ``rows`` by (width, parts)

    @property
    def total(self) -> int:
        return self.starts[-1] + self.widths[-1]

    def buffer(self, width: int) -> torch.Tensor:
        """A compacted dZ [total, width] in the matmul's dtype for the grad pass to fill, its padding rows 0: the
        first rows of a buffer of this module sized for every patch, which the next call hands out again (use it
        before asking for another)."""
        dZ = _workspace("dZ", (_capacity(*self.rank.shape), width), self.A.dtype, self.A.device)
        for start, count, rows in zip(self.starts, self.counts, self.widths):
            dZ[start + count:start + rows].zero_()
        return dZ[:self.total]

    def rows(self, width: int, parts: int = 1) -> torch.Tensor:
        """Element offsets [c, N, P] of each visible patch's row in a compacted buffer ``width`` wide, -1 where
        masked: the grad pass's ``rows``; with ``parts`` > 1, [c, parts, N, P]: the offsets of the row's parts
        of width / parts columns each (the variants side by side, as ``mrp_variants`` multiplies them).
        Computed once per (width, parts), as the variants of a step share them (three calls measured 1.4 ms
        of a shared R = 8 step)."""
        key = (width, parts)
        if key not in self._rows:
            at = torch.arange(parts, device=self.rank.device).view(parts, 1, 1) * (width // parts)
            rows = torch.where(self.rank.unsqueeze(1) >= 0, self.rank.unsqueeze(1) * width + at, -1)
            self._rows[key] = rows.squeeze(1) if parts == 1 else rows
        return self._rows[key]

    def weight_grad(self, dZ: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """dW [c, d, C] in ``dtype`` from the compacted dZ [total, C]: per run, its visible patches' rows only
        (the matmul runs in dZ's dtype, as net.weight_grad)."""
        d = self.A.shape[0] if self.columns else self.A.shape[1]
        dW = torch.empty(len(self.widths), d, dZ.shape[1], dtype=dZ.dtype, device=dZ.device)
        for r, (start, rows) in enumerate(zip(self.starts, self.widths)):
            A = self.A[:, start:start + rows] if self.columns else self.A[start:start + rows].t()
            torch.mm(A, dZ[start:start + rows], out=dW[r])
            net.matmul_flops.add(rows, d, dZ.shape[1])  # the product that runs
        return dW.to(dtype)


_WORKSPACE: dict[str, torch.Tensor] = {}


def _workspace(tag: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One buffer per tag, handed out again at the next call while its shape, dtype and device stay (the process
    keeps it). The packed patches (77 MB for shared data, R = 8) and the compacted dZ allocated afresh at every
    step measured 16.3-16.5 s per 200 shared R = 8 steps against 12.2-13.2 s from these buffers (the product
    over every patch: 13.8-15.7 s), on the 2-core AMD EPYC."""
    buf = _WORKSPACE.get(tag)
    if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != device:
        _WORKSPACE.pop(tag, None)
        buf = _WORKSPACE[tag] = torch.empty(shape, dtype=dtype, device=device)
    return buf


def _capacity(c: int, N: int, P: int) -> int:
    """Rows of the compacted buffers for c runs of N x P patches: room for every patch of every run."""
    return c * N * P


def pays_visible(X: torch.Tensor, keep: torch.Tensor) -> bool:
    """Whether a step's weight gradient runs over the visible patches only (``Visible``): on the CPU always,
    elsewhere with data shared by the chunk's several runs. Measured on a 2-core AMD EPYC, fresh processes
    alternating (benchmarks/sharing.py, benchmarks/README.md): shared data, R = 8, an MRP step with its
    controls 0.84x (median) the step over every patch; per-run data (each run packs patches of its own from
    memory), the default run's step R = 3 0.86x in bf16 (43.6-44.6 vs 49.3-52.0 ms, 4 pairs) and 0.71-0.89x
    in fp32 (0.78-0.88x with torch held to AVX2), R = 1 0.90x. On CUDA per-run data keeps the product over every patch (not measured there)."""
    return X.device.type == "cpu" or (X.shape[0] == 1 and keep.shape[0] > 1)


def visible_patches(X: torch.Tensor, Xt: torch.Tensor | None, keep: torch.Tensor, pack: Callable | None = None
                    ) -> Visible:
    """``Visible`` of patches X [Rd, N, P, d] (Rd = 1: shared by the runs, or c) with keep [c, N, P] (True =
    visible). ``pack(Xt, keep [c, N*P], starts, out)``: packs the columns of the transposed patches into out
    [d, rows + 1] (native.compact16) and returns True, or returns False; else the rows of X are gathered.
    The patches are held in a buffer of this module, which the next call overwrites: a step builds one chunk's,
    uses it, then builds the next chunk's."""
    c, N, P = keep.shape
    kf = keep.reshape(c, N * P)
    ranks = kf.cumsum(1)
    counts = ranks[:, -1].tolist()
    widths = [min(-(-n // VISIBLE_ROWS_STEP) * VISIBLE_ROWS_STEP, N * P) for n in counts]
    starts = [0]
    for n in widths[:-1]:
        starts.append(starts[-1] + n)
    total = starts[-1] + widths[-1]
    first = torch.tensor(starts, dtype=ranks.dtype, device=ranks.device).unsqueeze(1)
    rank = torch.where(kf, ranks - 1 + first, -1).view(c, N, P)
    d, cap = X.shape[-1], _capacity(c, N, P)
    if pack is not None and Xt is not None:
        A = _workspace("A", (d, cap + 1), Xt.dtype, Xt.device)
        if pack(Xt, kf, starts, A):
            for start, count, rows in zip(starts, counts, widths):
                A[:, start + count:start + rows].zero_()
            return Visible(counts, widths, starts, rank, A[:, :total], columns=True)
    A = _workspace("A", (cap, d), X.dtype, X.device)[:total]
    for r, (start, count, rows) in enumerate(zip(starts, counts, widths)):
        src = X[0 if X.shape[0] == 1 else r].reshape(N * P, d)
        torch.index_select(src, 0, kf[r].nonzero().squeeze(1), out=A[start:start + count])
        A[start + count:start + rows].zero_()
    return Visible(counts, widths, starts, rank, A, columns=False)


def diag_loss(h: torch.Tensor, t: torch.Tensor, D: torch.Tensor, power: float, fit: bool = False):
    """Mask reconstruction's loss with a diagonal decoder D [R, K] and each kernel's error divided by
    its target mean square ^ power (0: plain), and its gradients: (loss [R], dD [R, K], dh [R, N, K], D).
    ``fit``: D is first set to its least-squares optimum for these codes (the fitted-decoder control)."""
    if fit:
        D = objectives.fit_decoder(h, t, "diag")
    loss, dpred = _sq_error_grad(net.decode(h, D), t, power, per_channel=True)
    return loss, (dpred * h).sum(1), dpred * D.unsqueeze(1), D


@dataclass
class PatchOps:
    """The elementwise work of a step around its two matmuls, on Z = X W:

    ``pool(Z, keep, q, thr)`` -> (h over visible patches, h over all patches), the forward;
    ``grad(Z, keep, dh, q, thr, out=None)`` -> dZ (or written into ``out``), the backward. Both read Z once: the activation and
    its derivative are recomputed from Z instead of being stored, so a step's temporaries
    are Z and dZ in the matmul's dtype. ``sl(Z, y, q, thr, k, m)``: pool, the supervised head and grad
    fused where a row's samples need nothing from others (one read of Z). ``diag_loss(h, t, D, power, fit)``: the default mask-reconstruction
    loss on the pooled codes (~15 small ops eagerly, ~0.7 ms per step at the default shape; one
    C++ call fused). ``noise_max(Z, coef, Cf)``: the noise-memorisation probe's max over Z less its
    feature part (probes.noise_max; one pass over Z fused). ``visible(X, Xt, keep)``: the step's ``Visible``
    patches (the fused kernels pack the transposed patches' columns). ``EAGER``, or fused into one kernel each:
    ``ops(True)``.
    """

    pool: Callable
    grad: Callable
    diag_loss: Callable = diag_loss
    sl: Callable | None = None  # sl_patch_step in one pass over Z; None: composed from pool and grad
    noise_max: Callable = probes.noise_max  # the noise-memorisation probe's pass over Z
    visible: Callable = visible_patches  # MRP's visible patches, for its weight gradient


class _EagerOps(PatchOps):
    """pool_patches and patch_grad with in-place ops. ``pool`` computes act'(Z) on the way to act(Z)
    and keeps it for the ``grad`` of the same Z that follows in a step (three passes fewer)."""

    def __init__(self):
        self._kept: tuple | None = None  # (Z, q, thr, act'(Z)) of the last pool
        super().__init__(self._pool, self._grad)

    def _pool(self, Z, keep, q, thr):
        z = _wide(Z)
        u = z.clamp(0.0, thr).mul_(1.0 / thr)
        g = u.pow(q - 1)  # act'(z); torch's fast path for q = 3, 4 (exponents 2, 3), where u.pow(q) is slow
        a = (z - thr).clamp_(min=0.0).addcmul_(g, u, value=thr / q)
        self._kept = (Z, q, thr, g)
        h_all = a.sum(2)
        if keep is None:
            return h_all, h_all
        return a.mul_(keep.unsqueeze(-1)).sum(2), h_all

    def _grad(self, Z, keep, dh, q, thr, out=None, rows=None):
        kept, self._kept = self._kept, None
        if kept is not None and kept[0] is Z and kept[1:3] == (q, thr):
            g = kept[3]
        else:
            g = _wide(Z).clamp(0.0, thr).mul_(1.0 / thr).pow_(q - 1)
        g.mul_(dh.unsqueeze(2))
        if keep is not None and rows is None:
            g.mul_(keep.unsqueeze(-1))
        return _into(g, Z, out, rows)


EAGER = _EagerOps()


@functools.cache
def _compiled_fns() -> tuple[Callable, Callable]:
    runtime.use_persistent_compile_cache()
    # one graph per shape, dtype, layout and mask/no mask: a run with controls, shared data and several
    # chunk sizes can pass torch's default of 8 per function, after which it would silently run eagerly
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(pool_patches, dynamic=False), torch.compile(patch_grad, dynamic=False)


def backend_for(device: torch.device) -> str:
    """The fused kernels' implementation on a device: mrplab's C++ kernels on the CPU (native.py),
    torch.compile's elsewhere."""
    return "native" if device.type == "cpu" else "inductor"


def _fused_fn(backend: str, name: str) -> Callable:
    """One fused kernel (``name`` pool, grad, diag_loss or sl) that raises where it cannot be built. The
    native one computes eagerly the inputs it does not take (each native function returns None for them:
    a dtype, layout or q outside native.supports); torch.compile fuses pool and grad only."""
    eager = sl_patch_step if name == "sl" else getattr(EAGER, name)
    if backend == "inductor":
        if name in ("diag_loss", "sl", "noise_max"):
            return eager
        if name == "pool":
            return lambda *args: _compiled_fns()[0](*args)
        return lambda *args, out=None, rows=None: _into(_compiled_fns()[1](*args), args[0], out, rows)
    fn = getattr(native, name)

    def call(*args, **kwargs):
        res = fn(*args, **kwargs)
        return eager(*args, **kwargs) if res is None else res

    return call


def _with_fallback(fused: Callable, eager: Callable) -> Callable:
    """``fused``, or after its first failure (no working C++ compiler, an unsupported platform)
    ``eager``, which computes the same numbers, after one warning line."""
    state = {"fn": fused}

    def call(*args, **kwargs):
        try:
            return state["fn"](*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - any compiler failure falls back to the same math, eagerly
            if state["fn"] is eager:
                raise
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            warnings.warn(f"the fused kernels failed ({first[:200]}); continuing with the eager elementwise "
                          "kernels (set compile=false to skip them)", RuntimeWarning, stacklevel=3)
            state["fn"] = eager
            return eager(*args, **kwargs)

    return call


@functools.cache
def fused(backend: str) -> PatchOps:
    """The kernels of one implementation ("native" or "inductor"), each falling back to eager on its own."""
    kernels = [_with_fallback(_fused_fn(backend, name), getattr(EAGER, name)) for name in ("pool", "grad", "diag_loss")]
    native_ = backend == "native"
    pack = _with_fallback(native.compact16, lambda *args: False) if native_ else None
    return PatchOps(*kernels, _with_fallback(_fused_fn(backend, "sl"), sl_patch_step) if native_ else None,
                    _with_fallback(_fused_fn(backend, "noise_max"), EAGER.noise_max),
                    functools.partial(visible_patches, pack=pack))


@functools.cache
def ops(compiled: bool) -> PatchOps:
    """The step's elementwise kernels: eager, or each fused into one kernel, by the implementation
    for the device of the tensors it is given (``backend_for``; torch.compile's compile at the first
    call of each shape, dtype and layout, the native ones are built once per machine)."""
    if not compiled:
        return EAGER
    return PatchOps(lambda Z, *a: fused(backend_for(Z.device)).pool(Z, *a),
                    lambda Z, *a, **kw: fused(backend_for(Z.device)).grad(Z, *a, **kw),
                    lambda h, *a: fused(backend_for(h.device)).diag_loss(h, *a),
                    lambda Z, *a: _sl_of(fused(backend_for(Z.device)))(Z, *a),
                    lambda Z, *a: fused(backend_for(Z.device)).noise_max(Z, *a),
                    lambda X, *a: fused(backend_for(X.device)).visible(X, *a))


class FirstCallTimer(PatchOps):
    """Kernels that record how long their first calls took together (their compile, when they compile then)."""

    def __init__(self, inner: PatchOps):
        self.first_call_s: float | None = None
        self._first: dict[str, float] = {}
        super().__init__(self._timed("pool", inner.pool), self._timed("grad", inner.grad), inner.diag_loss,
                         inner.sl and self._timed("sl", inner.sl), inner.noise_max, inner.visible)

    def _timed(self, name: str, fn: Callable) -> Callable:
        def call(*args, **kwargs):
            if name in self._first:
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self._first[name] = time.perf_counter() - t0
            if {"pool", "grad"} <= self._first.keys():
                self.first_call_s = sum(self._first.values())
            return out
        return call


def _probe_args(shape: tuple[int, ...], thr: float, dtype: torch.dtype, device: torch.device):
    """Z, keep and dh of one chunk's shape [c, N, P, K], as a mask-reconstruction step sees them."""
    g = torch.Generator().manual_seed(0)
    c, N, P, K = shape
    Z = (torch.randn(shape, generator=g) * 0.5 * thr).to(device, dtype)
    keep = (torch.rand(c, N, P, generator=g) < 0.5).to(device)
    return Z, keep, torch.randn(c, N, K, generator=g).to(device)


def _time_step_ops(o: PatchOps, args, q: int, thr: float) -> float:
    Z, keep, dh = args

    def step():
        o.pool(Z, keep, q, thr)
        o.grad(Z, keep, dh, q, thr)
        if Z.is_cuda:
            torch.cuda.synchronize()

    return runtime.best_time(step, 0.05) * 1e3


def time_eager_ops(shape: tuple[int, ...], q: int, thr: float, dtype: torch.dtype = torch.float32,
                   device: torch.device = torch.device("cpu")) -> float:
    """ms per step of the eager elementwise kernels (forward and backward) at one chunk's shape."""
    return _time_step_ops(EAGER, _probe_args(shape, thr, dtype, device), q, thr)


def time_compiled_ops(shape: tuple[int, ...], q: int, thr: float, dtype: torch.dtype = torch.float32,
                      device: torch.device = torch.device("cpu")) -> tuple[float, float]:
    """(ms per step, seconds of the first calls: building or loading) of the fused kernels ``ops(True)``
    uses on ``device``, so a run that probed here pays no second build; raises if they cannot be built."""
    args = _probe_args(shape, thr, dtype, device)
    backend = backend_for(device)
    pool, grad = _fused_fn(backend, "pool"), _fused_fn(backend, "grad")
    t0 = time.perf_counter()
    pool(args[0], args[1], q, thr)
    grad(*args, q, thr)
    compile_s = time.perf_counter() - t0
    return _time_step_ops(PatchOps(pool, grad), args, q, thr), compile_s


def _softmax_ce(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-run mean CE [R], d(sum of losses)/d logits [R, N, k] and whether every sample's argmax is its
    label [R] (the first maximum, as argmax). y [Rd, N] or [R, N]. Written out (max, exp, sum, log): over a
    last axis of ~10 classes, torch's log_softmax and argmax cost ~0.3 and ~0.13 ms at [3, 1000, 10], this
    whole function ~0.1 ms."""
    R, N, k = logits.shape
    yy = y.expand(R, N).unsqueeze(-1)
    top, first = logits.max(-1, keepdim=True)
    e = (logits - top).exp_()
    s = e.sum(-1, keepdim=True)
    ly = logits.gather(-1, yy)
    loss = (s.log() - (ly - top)).squeeze(-1).mean(-1)  # -log softmax at the label
    dlogits = e.div_(s).scatter_add_(-1, yy, torch.full_like(ly, -1.0)).div_(N)
    return loss, dlogits, (first == yy).squeeze(-1).all(-1)


@functools.cache
def _class_sum(K: int, k: int, device: torch.device) -> torch.Tensor:
    """[K, k] bool, True where kernel j belongs to class i (j // m == i): h @ it is net.sl_logits as one matmul
    (the sum over a last axis of 8 costs ~0.12 ms at [3, 1000, 80], the matmul ~0.03 ms)."""
    return torch.arange(K, device=device).unsqueeze(1) // (K // k) == torch.arange(k, device=device)


CHUNK_ELEMS = 1 << 24  # elements of one chunk's [c, N, P, K] tensors (64 MiB in fp32)


def run_chunks(R: int, per_run_elems: int, budget: int | None = None) -> list[slice]:
    """Slices of the run axis whose [c, N, P, K] tensors hold at most ``budget`` (default CHUNK_ELEMS) elements.

    A step holds Z and dZ of its chunk (three more fp32 buffers on the eager path); the
    chunk bounds that memory for large configs. Below the bound, wider chunks pay: with
    shared data one matmul X[N*P, d] @ W[d, c*K] serves the chunk, and every kernel call
    covers c runs. Runs are independent, so a step is computed chunk by chunk: a run's
    result does not depend on which others are batched with it, to rounding (bitwise for per-run
    data at AVX-512, measured; held to AVX2, torch's reductions over a batch of runs rounded some
    values differently from one run alone; shared data in bf16 can round differently as the matmul's
    width changes).
    """
    c = max(1, (CHUNK_ELEMS if budget is None else budget) // max(per_run_elems, 1))
    return [slice(i, min(i + c, R)) for i in range(0, R, c)]


def chunks(X: torch.Tensor, W: torch.Tensor) -> list[slice]:
    """run_chunks for patches X [Rd, N, P, d] and kernels W [R, d, K]."""
    return run_chunks(W.shape[0], X.shape[1] * X.shape[2] * W.shape[2])


def run_rows(t: torch.Tensor, s: slice) -> torch.Tensor:
    """The runs s of a tensor with a leading run axis, or t itself when that axis is shared (size 1)."""
    return t if t.shape[0] == 1 else t[s]


def rows_or_none(t: torch.Tensor | None, s: slice) -> torch.Tensor | None:
    return None if t is None else run_rows(t, s)


def sl(X: torch.Tensor, y: torch.Tensor, W: torch.Tensor, q: int, thr: float, k: int, m: int,
       ops: PatchOps = EAGER, Xt: torch.Tensor | None = None):
    """Cross-entropy on F_i = sum of class i's kernels.

    Returns (loss [R], dW [R, d, K], fitted [R] bool: every sample classified correctly)."""
    loss, dW = W.new_empty(W.shape[0]), torch.empty_like(W)
    fitted = torch.empty(W.shape[0], dtype=torch.bool, device=W.device)
    for s in chunks(X, W):
        loss[s], dW[s], fitted[s] = _sl(run_rows(X, s), run_rows(y, s), W[s], q, thr, k, m, ops,
                                             rows_or_none(Xt, s))
    return loss, dW, fitted


def sl_patch_step(Z: torch.Tensor, y: torch.Tensor, q: int, thr: float, k: int, m: int, ops: PatchOps | None = None):
    """The supervised step's work on Z = X W [R, N, P, K]: (loss [R], dZ, fitted [R]), through ``ops``'s pool
    and grad (default EAGER). Every sample's loss and gradient depend on its own row of Z only."""
    ops = ops or EAGER
    h, _ = ops.pool(Z, None, q, thr)  # [R, N, K]
    logits = h @ _class_sum(k * m, k, h.device).to(h.dtype)  # [R, N, k]: net.sl_logits
    loss, dlogits, fitted = _softmax_ce(logits, y)
    R, N = dlogits.shape[:2]
    dh = dlogits.unsqueeze(-1).expand(R, N, k, m).reshape(R, N, k * m)  # every kernel of class i gets dF_i
    return loss, ops.grad(Z, None, dh, q, thr), fitted


def _sl_of(ops: PatchOps) -> Callable:
    """``ops``'s supervised step on Z: its fused one, or composed from its pool and grad."""
    return ops.sl or functools.partial(sl_patch_step, ops=ops)


def _sl(X, y, W, q, thr, k, m, ops, Xt):
    Z = net.preact(X, W, native=True)  # [R, N, P, K]
    loss, dZ, fitted = _sl_of(ops)(Z, y, q, thr, k, m)
    return loss, net.weight_grad(X, dZ, W.dtype, Xt), fitted


@dataclass(frozen=True)
class MRPSpec:
    """Which mask-reconstruction variant a step computes (config.MRPConfig documents each choice)."""

    target: str = "teacher"  # teacher | pixels
    scope: str = "all"  # all | masked: the patches the target pools
    norm: str = "per_kernel"  # none | per_kernel | per_run | per_sample
    power: float = 0.75  # power of the per_kernel / per_run divisor
    fit_decoder: bool = False  # the decoder set to its least-squares optimum every step
    shuffled: bool = False  # sample n gets sample n+1's target (within-sample prediction removed)

    @property
    def divisor_power(self) -> float:
        """The power of the loss's target-mean-square divisor: only per_kernel and per_run divide."""
        return self.power if self.norm in ("per_kernel", "per_run") else 0.0

    @staticmethod
    def of(cfg, q: int, fit_decoder: bool | None = None, shuffled: bool | None = None) -> "MRPSpec":
        """From a config.MRPConfig; fit_decoder / shuffled override decoder_fit / target_pairing (control runs)."""
        fit = cfg.decoder_fit == "lstsq" if fit_decoder is None else fit_decoder
        shuf = cfg.target_pairing == "shuffled" if shuffled is None else shuffled
        return MRPSpec(cfg.target, cfg.scope, cfg.target_norm, cfg.norm_power(q), fit, shuf)


@dataclass
class MRPGrads:
    loss: torch.Tensor  # [R]
    dW: torch.Tensor  # [R, d, K]
    dD: torch.Tensor  # like D
    D: torch.Tensor  # the decoder this step used (the fitted one under the control)
    codes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]  # per run chunk, for the logged diagnostics:
    # (the student's codes h [c, N, K] on the visible patches, the decoder used, the teacher's target or None)

    @property
    def pred_var(self) -> torch.Tensor:
        """[R] variance across samples of the decoder's output, mean over channels (a logged diagnostic,
        computed when asked for)."""
        return torch.cat([_sample_var(net.decode(h, D)) for h, D, _ in self.codes])

    @property
    def target_var(self) -> torch.Tensor | None:
        """[R] the same for the teacher's target; None for pixel targets."""
        if self.codes[0][2] is None:
            return None
        return torch.cat([_sample_var(t) for _, _, t in self.codes])


def _sample_var(x: torch.Tensor) -> torch.Tensor:
    """x.var(dim=1).mean(-1) for x [R, N, C], written out: torch's var over the middle axis is ~12x slower."""
    c = x - x.mean(1, keepdim=True)
    return (c * c).sum(1).div_(x.shape[1] - 1).mean(-1)


def _sq_error_grad(pred: torch.Tensor, target: torch.Tensor, power: float, per_channel: bool):
    """objectives._normalised_sq_error and its gradient wrt pred. pred, target [R, N, C]."""
    N = pred.shape[1]
    diff = pred - target
    scale = torch.ones_like(diff[:, :1, :])  # [R, 1, C]
    if power != 0:
        ms = target.pow(2).mean(1, keepdim=True)  # [R, 1, C]
        if not per_channel:
            ms = ms.sum(-1, keepdim=True)
        scale = ms.clamp(min=1e-30).pow(-power).expand_as(scale)
    loss = (diff.pow(2).mean(1, keepdim=True) * scale).sum((1, 2))  # [R]
    return loss, diff * (2.0 * scale / N)


def mrp(
    X: torch.Tensor, W: torch.Tensor, D: torch.Tensor, mask: torch.Tensor, q: int, thr: float,
    spec: MRPSpec, W_teacher: torch.Tensor | None = None, ops: PatchOps = EAGER, Xt: torch.Tensor | None = None,
) -> MRPGrads:
    """Mask reconstruction: student on the visible patches, teacher (or pixels) as the target.

    mask [R, N, P] True = masked. W_teacher None = stop-gradient copy of the student.
    """
    return _mrp_each(X, [W], [D], mask, q, thr, [spec], [W_teacher], ops, Xt)[0]


def _mrp_each(X, Ws, Ds, mask, q, thr, specs, W_teachers, ops: PatchOps, Xt) -> list[MRPGrads]:
    """``mrp`` of each variant (Ws[v], Ds[v], specs[v], W_teachers[v]) on its own, run chunk by run chunk, the
    variants of a chunk sharing its ``Visible`` patches where its weight gradient runs over them only
    (``pays_visible``)."""
    parts: list[list[MRPGrads]] = [[] for _ in Ws]
    for s in chunks(X, Ws[0]):
        vis = ops.visible(run_rows(X, s), rows_or_none(Xt, s), ~mask[s]) if pays_visible(X, mask[s]) else None
        for v, (W, D, spec, W_t) in enumerate(zip(Ws, Ds, specs, W_teachers)):
            parts[v].append(_mrp(run_rows(X, s), W[s], D[s], mask[s], q, thr, spec, None if W_t is None else W_t[s],
                                 ops, rows_or_none(Xt, s), vis))
    return [_joined(p) for p in parts]


def _joined(parts: list[MRPGrads]) -> MRPGrads:
    """One MRPGrads from those of consecutive run chunks."""
    if len(parts) == 1:
        return parts[0]
    return MRPGrads(loss=torch.cat([p.loss for p in parts]), dW=torch.cat([p.dW for p in parts]),
                    dD=torch.cat([p.dD for p in parts]), D=torch.cat([p.D for p in parts]),
                    codes=[c for p in parts for c in p.codes])


def _mrp(X, W, D, mask, q, thr, spec: MRPSpec, W_teacher, ops, Xt, vis: Visible | None = None) -> MRPGrads:
    keep = ~mask  # [R, N, P]
    Z = net.preact(X, W, native=True)  # [R, N, P, K]
    h_s, h_all = ops.pool(Z, keep, q, thr)  # [R, N, K]: the student sees the visible patches only
    h_vis_t = h_s  # the stop-gradient student as the teacher: the same Z
    if spec.target == "teacher" and W_teacher is not None:  # the EMA teacher on the full input
        h_vis_t, h_all = ops.pool(net.preact(X, W_teacher, native=True), keep, q, thr)
    loss, dD, dh, D, target = _mrp_loss(X, mask, h_s, h_vis_t, h_all, D, spec, ops)
    # only visible patches reach the student's output (shared data: dZ of those alone, compacted)
    if vis is None:
        dW = net.weight_grad(X, ops.grad(Z, keep, dh, q, thr), W.dtype, Xt)
    else:
        K = Z.shape[-1]
        dW = vis.weight_grad(ops.grad(Z, keep, dh, q, thr, out=vis.buffer(K), rows=vis.rows(K)), W.dtype)
    return MRPGrads(loss=loss, dW=dW, dD=dD, D=D, codes=[(h_s, D, target)])


def _mrp_loss(X, mask, h_s, h_vis_t, h_all, D, spec: MRPSpec, ops):
    """The loss on the student's codes h_s [R, N, K] (visible patches) and its gradients: (loss [R], dD, dh
    [R, N, K], the decoder used, the teacher's target or None). h_vis_t, h_all: the teacher's codes over the
    visible and over all patches (teacher target only)."""
    if spec.target == "teacher":
        t = h_all if spec.scope == "all" else h_all - h_vis_t  # [R, N, K] pooled over all / the masked patches
        if spec.shuffled:
            t = t.roll(-1, dims=1)  # sample n's target is sample n+1's
        t = objectives.normalise_target(t, spec.norm)
        if D.dim() == 2 and (spec.norm == "per_kernel" or spec.divisor_power == 0):
            loss, dD, dh, D = ops.diag_loss(h_s, t, D, spec.divisor_power, spec.fit_decoder)
            return loss, dD, dh, D, t
        if spec.fit_decoder:
            D = objectives.fit_decoder(h_s, t, "full" if D.dim() == 3 else "diag")
        loss, dpred = _sq_error_grad(net.decode(h_s, D), t, spec.divisor_power, spec.norm == "per_kernel")
        if D.dim() == 3:
            dD = torch.bmm(h_s.transpose(1, 2), dpred)  # [R, K, K]
            dh = torch.bmm(dpred, D.transpose(1, 2))  # [R, N, K]
        else:  # one divisor per run
            dD = (dpred * h_s).sum(1)  # [R, K]
            dh = dpred * D.unsqueeze(1)
        return loss, dD, dh, D, t
    Xf = X.float().expand(mask.shape[0], *X.shape[1:])
    sel = mask if spec.scope == "masked" else torch.ones_like(mask)
    t = torch.einsum("rnp,rnpd->rnd", sel.to(Xf.dtype), Xf)  # content of the patches in scope
    if spec.shuffled:
        t = t.roll(-1, dims=1)
    if spec.fit_decoder:
        D = objectives.fit_decoder(h_s, t, "full")
    pred = torch.bmm(h_s, D)  # [R, N, d] pixel decoder D [R, K, d]
    loss, dpred = _sq_error_grad(pred, t, spec.divisor_power, per_channel=False)
    dD = torch.bmm(h_s.transpose(1, 2), dpred)  # [R, K, d]
    dh = torch.bmm(dpred, D.transpose(1, 2))  # [R, N, K]
    return loss, dD, dh, D, None


def mrp_variants(X: torch.Tensor, Ws: list[torch.Tensor], Ds: list[torch.Tensor], mask: torch.Tensor, q: int,
                 thr: float, specs: list[MRPSpec], ops: PatchOps = EAGER,
                 Xt: torch.Tensor | None = None) -> list[MRPGrads]:
    """``mrp`` of V variants (MRP and its controls: kernels Ws[v] [R, d, K], decoders Ds[v], objectives specs[v])
    that share the patches, the masks and the stop-gradient teacher, each variant's result as ``mrp`` gives it.

    With per-run data a run's V matmuls run as one: X[N*P, d] @ [W_1 | ... | W_V] [d, V*K] and X^T @ dZ
    [N*P, V*K]: at the default shape the pair ran at ~1.35x the rate of V products K wide, the forward at ~1.6x.
    The pool and grad passes take a run's V variants as the runs of one kernel call ([V, N, P, K] inside its
    [N, P, V, K] block), the grad writing into the one dZ. Each column of the wide product is the same dot
    product as in the narrow one, so a variant's numbers are those it gets alone, bitwise where the BLAS
    computes a column the same way at either width (so on an AMD EPYC at the default shapes, fp32 and bf16; not
    at some small fp32 shapes), else to rounding (tests/theory/test_steps.py and test_train.py check both).
    Where ``pays_visible`` (the CPU), the grad pass writes only the visible patches' rows, the variants side by
    side (V*K wide), and each run's weight gradient is one product over its visible patches (``Visible``).
    Shared data (one data set for R > 1 runs) already multiplies R*K columns at once; batching the variants
    too measured no faster there (benchmarks/README.md), so each variant runs on its own, the variants sharing
    each chunk's ``Visible`` patches for their weight gradients.
    """
    V = len(Ws)
    R, _, K = Ws[0].shape
    if V == 1 or (X.shape[0] == 1 and R > 1):  # chunk by chunk, the variants sharing its visible patches
        return _mrp_each(X, Ws, Ds, mask, q, thr, specs, [None] * V, ops, Xt)
    parts = [_mrp_variants(run_rows(X, s), [W[s] for W in Ws], [D[s] for D in Ds], mask[s], q, thr, specs, ops,
                           rows_or_none(Xt, s))
             for s in run_chunks(R, X.shape[1] * X.shape[2] * K * V)]
    return [_joined([p[v] for p in parts]) for v in range(V)]


def _mrp_variants(X, Ws, Ds, mask, q, thr, specs, ops, Xt) -> list[MRPGrads]:
    V, (R, d, K), (_, N, P, _) = len(Ws), Ws[0].shape, X.shape
    keep = ~mask  # [R, N, P]
    Zw = net.preact(X, torch.stack(Ws, 2).view(R, d, V * K), native=True)  # [R, N, P, V*K]: variants side by side
    Z = Zw.view(R, N, P, V, K).permute(0, 3, 1, 2, 4)  # [R, V, N, P, K]
    keeps = [keep[r].expand(V, N, P) for r in range(R)]  # a run's variants share its mask
    pooled = [ops.pool(Z[r], keeps[r], q, thr) for r in range(R)]  # each ([V, N, K], same)
    # each variant's codes [R, N, K] in a contiguous buffer of their own, as its own step has them
    h_vis, h_all = ([torch.stack([h[v] for h in hs]) for v in range(V)] for hs in zip(*pooled))
    losses = [_mrp_loss(X, mask, h_vis[v], h_vis[v], h_all[v], Ds[v], specs[v], ops) for v in range(V)]
    dh = torch.stack([dh_v for _, _, dh_v, _, _ in losses], 1)  # [R, V, N, K]
    # only visible patches reach the student's output: dZ of those alone, compacted (``Visible``), or over every
    # patch, 0 on the masked ones
    if pays_visible(X, keep):
        vis = ops.visible(X, Xt, keep)
        dZc, rows = vis.buffer(V * K), vis.rows(V * K, V)  # rows [R, V, N, P]: a run's variants side by side
        for r in range(R):
            ops.grad(Z[r], keeps[r], dh[r], q, thr, out=dZc, rows=rows[r])
        dW = vis.weight_grad(dZc, Ws[0].dtype)
    else:
        dZw = torch.empty(Zw.shape, dtype=Zw.dtype, device=Zw.device)
        dZ = dZw.view(R, N, P, V, K).permute(0, 3, 1, 2, 4)
        for r in range(R):
            ops.grad(Z[r], keeps[r], dh[r], q, thr, out=dZ[r])
        dW = net.weight_grad(X, dZw, Ws[0].dtype, Xt)
    dW = dW.view(R, d, V, K)
    return [MRPGrads(loss=loss, dW=dW[:, :, v], dD=dD, D=D, codes=[(h_vis[v], D, t)])
            for v, (loss, dD, _, D, t) in enumerate(losses)]


@torch.no_grad()
def encode(X: torch.Tensor, W: torch.Tensor, q: int, thr: float, ops: PatchOps = EAGER) -> torch.Tensor:
    """Encoder outputs h [R, N, K] for evaluation and probes, computed run chunk by run chunk with the
    run's forward kernel (net.encode is the reference it matches)."""
    h = W.new_empty(W.shape[0], X.shape[1], W.shape[2])
    for s in chunks(X, W):
        h[s] = ops.pool(net.preact(run_rows(X, s), W[s], native=True), None, q, thr)[0]
    return h


def head(h: torch.Tensor, y: torch.Tensor, hd: net.LinearHead):
    """Linear head on fixed encoder outputs h [R, N, K]: (loss, dH, db)."""
    hs = (h - hd.center) / hd.scale
    loss, dlogits, _ = _softmax_ce(torch.bmm(hs, hd.H) + hd.b.unsqueeze(1), y)
    return loss, torch.bmm(hs.transpose(1, 2), dlogits), dlogits.sum(1)


def finetune(X: torch.Tensor, y: torch.Tensor, W: torch.Tensor, hd: net.LinearHead, q: int, thr: float,
             ops: PatchOps = EAGER, Xt: torch.Tensor | None = None):
    """Encoder + linear head: (loss, dW, dH, db)."""
    loss, dW = W.new_empty(W.shape[0]), torch.empty_like(W)
    dH, db = torch.empty_like(hd.H), torch.empty_like(hd.b)
    for s in chunks(X, W):
        loss[s], dW[s], dH[s], db[s] = _finetune(run_rows(X, s), run_rows(y, s), W[s], hd.runs(s), q, thr, ops,
                                                       rows_or_none(Xt, s))
    return loss, dW, dH, db


def _finetune(X, y, W, hd, q, thr, ops, Xt):
    Z = net.preact(X, W, native=True)
    h, _ = ops.pool(Z, None, q, thr)
    hs = (h - hd.center) / hd.scale
    loss, dlogits, _ = _softmax_ce(torch.bmm(hs, hd.H) + hd.b.unsqueeze(1), y)
    dH = torch.bmm(hs.transpose(1, 2), dlogits)
    dh = torch.bmm(dlogits, hd.H.transpose(1, 2)) / hd.scale  # [R, N, K]
    return loss, net.weight_grad(X, ops.grad(Z, None, dh, q, thr), W.dtype, Xt), dH, dlogits.sum(1)
