"""runtime.py: precision and compile choices (probe answers forced both ways), the cache, core sharing."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
import torch

from mrplab import runtime

CPU = torch.device("cpu")
SHAPES = [(64, 32, 16)]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MRPLAB_CACHE_DIR", str(tmp_path / "cache"))


def _rates(monkeypatch, fp32: float, bf16: float, probes: list | None = None) -> list[torch.dtype]:
    """Force the matmul probe's answer; returns the dtypes it was asked to measure (``probes`` collects each
    probe's dtypes)."""
    asked: list[torch.dtype] = []

    def fake(shapes, dtypes, device, budget_s=0.3, autocast=False):
        asked.extend(dtypes)
        if probes is not None:
            probes.append(list(dtypes))
        return [bf16 if dtype == torch.bfloat16 else fp32 for dtype in dtypes]

    monkeypatch.setattr(runtime, "matmul_rates", fake)
    return asked


def test_auto_never_picks_bf16_without_native_bf16(monkeypatch):
    asked = _rates(monkeypatch, fp32=100.0, bf16=1000.0)  # even a probe that says bf16 is 10x faster
    p, why, rates = runtime.choose_precision("auto", CPU, SHAPES, native=lambda d: (False, "no avx512_bf16 flag"))
    assert p == "fp32"
    assert "no avx512_bf16 flag" in why and why.startswith("auto:")
    assert torch.bfloat16 not in asked  # emulated bf16 is not even probed
    assert set(rates) == {"fp32"}


def test_native_bf16_follows_the_cpu_flags_and_a_restricted_isa(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(runtime, "cpu_info", lambda: {"model": "x", "flags": {"avx2", "fma"}, "capability": "AVX2"})
    ok, why = runtime.native_bf16(CPU)
    assert not ok and "no avx512_bf16 or amx_bf16" in why
    monkeypatch.setattr(runtime, "cpu_info", lambda: {"model": "x", "flags": {"avx512_bf16"}, "capability": "AVX512"})
    assert runtime.native_bf16(CPU) == (True, "CPU flags avx512_bf16")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # torch's matmuls held to AVX2: bf16 is emulated
    assert not runtime.native_bf16(CPU)[0]


def test_auto_picks_bf16_only_when_native_and_measured_faster(monkeypatch):
    _rates(monkeypatch, fp32=100.0, bf16=200.0)
    p, why, rates = runtime.choose_precision("auto", CPU, SHAPES, native=lambda d: (True, "CPU flags amx_bf16"))
    assert p == "bf16" and "amx_bf16" in why and "2.00x" in why
    assert rates == {"fp32": 100.0, "bf16": 200.0}


def test_auto_keeps_fp32_when_native_bf16_is_not_faster(monkeypatch):
    _rates(monkeypatch, fp32=100.0, bf16=105.0)  # native, but under the 1.15x bf16 must gain
    p, why, _ = runtime.choose_precision("auto", CPU, SHAPES, native=lambda d: (True, "CPU flags avx512_bf16"))
    assert p == "fp32" and "1.05x" in why and "under" in why


def test_explicit_precision_is_kept_with_its_reason(monkeypatch):
    _rates(monkeypatch, fp32=100.0, bf16=10.0)
    assert runtime.choose_precision("bf16", CPU, SHAPES)[:2] == ("bf16", "set by the config (precision)")


def test_probe_results_are_cached_per_machine(monkeypatch):
    asked = _rates(monkeypatch, fp32=100.0, bf16=200.0)
    native = lambda d: (True, "CPU flags amx_bf16")  # noqa: E731
    first = runtime.choose_precision("auto", CPU, SHAPES, native=native)
    n = len(asked)
    second = runtime.choose_precision("auto", CPU, SHAPES, native=native)
    assert (first[0], first[2]) == (second[0], second[2]) and len(asked) == n == 2  # the second run measured nothing
    assert "(probed now)" in first[1]
    # the reason says the rates came from the cache and when they were measured
    when = json.loads((runtime.cache_dir() / "runtime.json").read_text())["entries"]
    (stamp,) = {e["measured"] for e in when.values()}
    assert f"(probe of {stamp}, cached)" in second[1]
    runtime.choose_precision("auto", CPU, [(128, 32, 16)], native=native)  # other shapes: measured anew
    assert len(asked) == 4


def test_the_precisions_auto_compares_come_from_one_probe(monkeypatch):
    """fp32 and bf16 are measured in one interleaved probe; where one is cached and the other is not, both are
    measured again, so auto never compares rates from different moments."""
    probes: list = []
    _rates(monkeypatch, fp32=100.0, bf16=200.0, probes=probes)
    native = lambda d: (True, "CPU flags amx_bf16")  # noqa: E731
    runtime.choose_precision("fp32", CPU, SHAPES)  # a run with fp32 set caches fp32 alone
    _rates(monkeypatch, fp32=150.0, bf16=200.0, probes=probes)  # the machine's speed has changed since
    p, why, rates = runtime.choose_precision("auto", CPU, SHAPES, native=native)
    assert probes == [[torch.float32], [torch.float32, torch.bfloat16]]
    assert rates == {"fp32": 150.0, "bf16": 200.0} and p == "bf16" and "1.33x" in why
    assert runtime.choose_precision("bf16", CPU, SHAPES)[2] == {"bf16": 200.0} and len(probes) == 2  # cached
    # other shapes: a bf16 run, then an fp32 run, each probes its own precision, and the fp32 probe replaces
    # the entry; auto then measures both again rather than compare the bf16 rate with the later fp32 one
    other = [(128, 32, 16)]
    runtime.choose_precision("bf16", CPU, other)
    runtime.choose_precision("fp32", CPU, other)
    runtime.choose_precision("auto", CPU, other, native=native)
    runtime.choose_precision("auto", CPU, other, native=native)
    assert probes[2:] == [[torch.bfloat16], [torch.float32], [torch.float32, torch.bfloat16]]


def test_best_times_calls_the_functions_in_turn():
    """The probe's functions alternate call by call (a warm-up call of each first), so drift reaches both."""
    calls: list[str] = []
    fns = [lambda: calls.append("a"), lambda: calls.append("b")]
    best = runtime.best_times(fns, budget_s=0.0)
    assert calls == ["a", "b"] * 4 and len(best) == 2 and all(0 <= t < 1 for t in best)
    calls.clear()
    runtime.best_times(fns, budget_s=0.0, burst=2)  # the matmul probe's bursts: each precision's data hot again
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 3


def test_best_times_holds_the_ratio_through_drift(monkeypatch):
    """A machine that speeds up 4x during the probe: in turn, a function that costs 2x another reads 2x;
    measured one after the other, as the probe did before, the later one read as the cheaper."""
    clock = [0.0]
    speed = lambda: 4.0 if clock[0] > 60 else 1.0  # noqa: E731

    def cost(units):
        def fn():
            clock[0] += units / speed()
        return fn

    monkeypatch.setattr(runtime.time, "perf_counter", lambda: clock[0])
    cheap, dear = runtime.best_times([cost(1.0), cost(2.0)], budget_s=100.0)
    assert dear / cheap == pytest.approx(2.0)
    clock[0] = 0.0
    cheap_alone, dear_alone = runtime.best_time(cost(1.0), 50.0), runtime.best_time(cost(2.0), 50.0)
    assert dear_alone / cheap_alone < 1.0


def test_probe_cache_is_kept_apart_per_instruction_set_cap(monkeypatch):
    """An ISA cap changes what a matmul measures: a capped process must not read the uncapped rates."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("MKL_ENABLE_INSTRUCTIONS", raising=False)
    asked = _rates(monkeypatch, fp32=100.0, bf16=200.0)
    runtime.measure_matmuls(CPU, SHAPES, ["fp32"])
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    runtime.measure_matmuls(CPU, SHAPES, ["fp32"])
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")  # MKL runs the fp32 matmuls
    runtime.measure_matmuls(CPU, SHAPES, ["fp32"])
    runtime.measure_matmuls(CPU, SHAPES, ["fp32"])
    assert len(asked) == 3  # measured uncapped, with each cap, then read from the cache


def test_real_probe_measures_positive_rates():
    r = runtime.matmul_gflops([(256, 64, 32)], torch.float32, CPU, budget_s=0.02)
    assert 0.01 < r < 1e5
    both = runtime.matmul_rates([(256, 64, 32), (128, 64, 16)], [torch.float32, torch.bfloat16], CPU, budget_s=0.02)
    assert len(both) == 2 and all(0.01 < x < 1e5 for x in both)


def _compile_choice(calls, eager_ms=2.0, compiled=(0.5, 3.0), fails=False):
    log: list[str] = []

    def time_eager():
        log.append("eager")
        return eager_ms

    def time_compiled():
        log.append("compiled")
        if fails:
            raise RuntimeError("no C++ compiler found\nmore")
        return compiled

    return runtime.choose_compile("auto", CPU, ("ops", "fp32", (1, 2)), calls, time_eager, time_compiled), log


def test_compile_auto_skips_short_runs_without_compiling():
    (on, why, probed), log = _compile_choice(calls=100)  # 100 x 2 ms = 0.2 s of work: nothing to save
    assert not on and not probed and "too short" in why and log == ["eager"]


def test_compile_auto_compiles_long_runs_and_caches_the_probe():
    (on, why, probed), log = _compile_choice(calls=10_000)
    assert on and probed and log == ["eager", "compiled"]
    # a later run: the cache answers, and the compile cost (3 s) now counts against the saving
    (on2, why2, probed2), log2 = _compile_choice(calls=10_000)
    assert on2 and not probed2 and log2 == [] and "3.0 s to compile" in why2
    (on3, why3, _), _ = _compile_choice(calls=1_500)  # 1,500 x 1.5 ms = 2.25 s < 3 s
    assert not on3 and "too short" in why3


def test_compile_auto_off_where_the_compiler_fails():
    (on, why, probed), _ = _compile_choice(calls=10_000, fails=True)
    assert not on and not probed and "does not work" in why and "no C++ compiler found" in why
    (on2, _, _), log2 = _compile_choice(calls=10_000)
    assert not on2 and log2 == []  # remembered: no second attempt on this machine


def test_compile_explicit_choice_is_kept():
    assert runtime.choose_compile(True, CPU, "k", 1, lambda: 1.0, lambda: (1.0, 1.0))[:2] == (
        True, "set by the config (compile)")


def test_core_share_divides_cores_among_live_processes():
    cores = runtime.available_cores()[0]
    folder = runtime.cache_dir() / "procs"
    folder.mkdir(parents=True)
    other = subprocess.Popen(["sleep", "60"])
    try:
        (folder / str(other.pid)).write_text(runtime._start_time(other.pid) or "")
        (folder / "999999999").write_text("")  # a process that has ended: its file is swept away
        share = runtime.CoreShare(interval=0.0)
        assert share.threads == max(1, cores // 2) == torch.get_num_threads()
        assert "shared by 2 running mrplab processes" in share.reason
        assert not (folder / "999999999").exists()
        other.kill()
        other.wait()
        time.sleep(0.05)
        assert share.refresh() == cores  # the other run ended: this one takes all cores again
        assert sorted(set(share.seen)) == sorted({max(1, cores // 2), cores})
        share.close()
        assert not (folder / str(os.getpid())).exists()
    finally:
        other.kill()
        torch.set_num_threads(cores)


def test_core_share_respects_explicit_threads():
    with runtime.CoreShare(requested=1) as share:
        assert share.threads == 1 == torch.get_num_threads()
        assert share.reason == "set by the config (threads)"
    torch.set_num_threads(runtime.available_cores()[0])


def test_flop_counter_counts_the_engine_matmuls():
    from mrplab.theory import steps

    R, N, P, d, K = 2, 5, 4, 6, 3
    X, W = torch.randn(R, N, P, d), torch.randn(R, d, K)
    y = torch.randint(0, 3, (R, N))
    before = runtime.matmul_flops.total
    steps.sl(X, y, W, 4, 1.0, 3, 1, steps.EAGER)
    assert runtime.matmul_flops.total - before == 2 * (2 * R * N * P * d * K)  # forward and weight gradient


def test_flop_counter_keys_each_product_by_the_shape_that_ran():
    """Per-run data: R products [N*P, d] @ [d, K]; shared data: one [N*P, d] @ [d, R*K]; MRP's variants
    batched: [N*P, d] @ [d, V*K] per run."""
    from mrplab.theory import steps

    R, N, P, d, K = 2, 5, 4, 6, 3
    W, y, mask = torch.randn(R, d, K), torch.randint(0, 3, (R, N)), torch.rand(R, N, P) < 0.5
    for X, shape in ((torch.randn(R, N, P, d), (N * P, d, K)), (torch.randn(1, N, P, d), (N * P, d, R * K))):
        before = dict(runtime.matmul_flops.by_shape)
        steps.sl(X, y, W, 4, 1.0, 3, 1, steps.EAGER)
        assert runtime.matmul_flops.since(before) == {shape: 2 * (2 * R * N * P * d * K)}
    X, spec = torch.randn(R, N, P, d), steps.MRPSpec()
    before = dict(runtime.matmul_flops.by_shape)
    steps.mrp_variants(X, [W, W + 1, W - 1], [torch.ones(R, K)] * 3, mask, 4, 1.0, [spec] * 3)
    assert runtime.matmul_flops.since(before) == {(N * P, d, 3 * K): 3 * 2 * (2 * R * N * P * d * K)}


def test_huge_pages_says_what_is_in_effect(monkeypatch):
    monkeypatch.setattr(runtime, "_thp_mode", lambda: "madvise")
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
    assert "torch asks for them" in runtime.huge_pages()
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    assert "does not ask" in runtime.huge_pages()
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE")
    assert "does not ask" in runtime.huge_pages()
    monkeypatch.setattr(runtime, "_thp_mode", lambda: "never")
    assert "never" in runtime.huge_pages()
    monkeypatch.setattr(runtime, "_thp_mode", lambda: None)
    assert runtime.huge_pages().startswith("no transparent huge pages")


@pytest.mark.parametrize("preset", [None, "0"])
def test_cli_requests_huge_pages_before_torch_unless_the_user_chose(preset):
    """The CLI asks torch for huge pages before torch is imported (torch reads the variable once);
    a value the user set stays."""
    import sys

    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if preset is not None:
        env["THP_MEM_ALLOC_ENABLE"] = preset
    code = ("import sys, os, mrplab.cli as c; assert 'torch' not in sys.modules; c._request_huge_pages(); "
            "print(os.environ.get('THP_MEM_ALLOC_ENABLE'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == (preset or "1")


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"version": %d, "entries": [1]}', '{"version": -1, "entries": {}}',
                                  '{"version": %d, "entries": {"k": 5}}', "damaged entries"])
def test_a_damaged_cache_is_measured_again_and_replaced(monkeypatch, text):
    """Whatever the cache file holds, a run gets its answer (measured anew) and leaves a cache that works."""
    native = lambda d: (True, "CPU flags amx_bf16")  # noqa: E731
    path = runtime.cache_dir() / "runtime.json"
    if text == "damaged entries":  # a rate that is not a number, a compile entry without its timings
        _rates(monkeypatch, fp32=100.0, bf16=200.0)
        runtime.choose_precision("auto", CPU, SHAPES, native=native)
        _compile_choice(calls=10_000)
        blob = json.loads(path.read_text())
        for entry in blob["entries"].values():
            entry.update({"bf16": "fast", "fp32": float("nan")} if "bf16" in entry else {"works": True, "eager_ms": None})
        path.write_text(json.dumps(blob))
    else:
        path.parent.mkdir(parents=True)
        path.write_text(text.replace("%d", str(runtime.CACHE_VERSION)))
    asked = _rates(monkeypatch, fp32=100.0, bf16=200.0)
    first = runtime.choose_precision("auto", CPU, SHAPES, native=native)
    assert first[0] == "bf16" and len(asked) == 2
    second = runtime.choose_precision("auto", CPU, SHAPES, native=native)
    assert (second[0], second[2]) == (first[0], first[2]) and "cached)" in second[1] and len(asked) == 2
    (on, _, probed), log = _compile_choice(calls=10_000)
    assert on and probed and log == ["eager", "compiled"]  # probed anew
    (on, _, probed), log = _compile_choice(calls=10_000)
    assert on and not probed and log == []  # and cached again
