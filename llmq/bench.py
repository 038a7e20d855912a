"""Benchmarks behind `llmq bench kernels` and `llmq bench generate`: print a table, write JSON, assert nothing.

Protocol (DESIGN.md, "measure, don't guess"): every configuration is timed in one process, interleaved round by
round (A B C, A B C, ...), and each reports the median of its rounds, so a noisy neighbour slows all of them
alike and the ratios stay meaningful. Kernel timings cycle through enough distinct copies of a layer that the
weights come from memory, not cache, as they do when a model decodes layer after layer.

Tests check the kernels' numbers (tests/test_kernels_*.py); nothing here is a test, and no timing is asserted.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import kernels, numerics
from .checkpoint.quant_linear import QuantLinear
from .environment import DTYPES, default_device
from .evaluation.checkpoint_info import describe_checkpoint
from .io import write_json_atomic
from .kernels import cpu
from .loading import load_model
from .model.resolve import resolve
from .numerics import Scheme

logger = logging.getLogger(__name__)

CPU_SHAPES = [(576, 576), (576, 1536), (1536, 576), (576, 49152)]  # SmolLM2-135M: attention, MLP up / down, lm_head
GPU_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192), (8192, 28672)]  # (K, N) of the targets
COLD_BYTES = 256 << 20  # weights cycled per timing: well past any CPU L3 or GPU L2


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(fns: dict[str, Callable[[], Any]], rounds: int, device: torch.device, inner: int = 1) -> dict[str, float]:
    """Seconds per call of each fn: `inner` warm-up calls each, then `rounds` interleaved rounds of `inner` calls;
    medians. On CUDA each fn's `inner` calls are captured once as a CUDA graph and its replays timed with events, so
    Python's launch overhead (tens of µs per Triton launch) is not mistaken for kernel time."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        for _ in range(inner):
            fn()  # warm-up: packing, allocator pools, autotuning, every copy once
    if device.type == "cuda":
        fns = {name: _captured(fn, inner, device) for name, fn in fns.items()}
    for _ in range(rounds):
        for name, fn in fns.items():
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) / 1e3 / inner)
                continue
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - t0) / inner)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _captured(fn: Callable[[], Any], inner: int, device: torch.device) -> Callable[[], Any]:
    """`inner` calls of fn recorded as one CUDA graph; returns its replay."""
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    torch.cuda.synchronize(device)
    return graph.replay


def memory_bandwidth(device: torch.device, n_bytes: int = 512 << 20, rounds: int = 5) -> float:
    """Measured copy bandwidth in bytes/s (read + write), the yardstick for '% of bandwidth'."""
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = interleaved_medians({"copy": lambda: dst.copy_(src)}, rounds, device)["copy"]
    return 2 * n_bytes / t


# ------------------------------------------------------------------------------------------------- kernels


@dataclass
class KernelRow:
    k: int
    n: int
    m: int
    group_size: int | None
    kernel: str  # "dense fp32" / "dense bf16" / a llmq kernel name
    dtype: str
    us: float
    tflops: float
    gbps: float
    pct_bandwidth: float
    speedup_vs_bf16: float | None = None


def _random_layer(k: int, n: int, scheme: Scheme, device: torch.device, dtype: torch.dtype, seed: int) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    layer = QuantLinear(k, n, False, scheme, dtype=dtype)
    layer.load_qweight(numerics.quantize(w, scheme))
    return layer.to(device)


def bench_kernels(
    shapes: list[tuple[int, int]] | None = None,
    ms: list[int] | None = None,
    bits: int = 4,
    group_size: int | None = 128,
    device: str | None = None,
    rounds: int = 5,
) -> dict[str, Any]:
    """Time one layer's matmul per (K, N) shape and batch size M: dense fp32 / bf16 against llmq's kernels."""
    dev = torch.device(device or default_device())
    shapes = shapes or (GPU_SHAPES if dev.type == "cuda" else CPU_SHAPES)
    ms = ms or ([1, 16, 2048] if dev.type == "cuda" else [1, 16, 128])
    act = torch.bfloat16  # the yardstick: bf16 activations against a dense bf16 matmul
    quant_kernels = ["cpu", "reference"] if dev.type == "cpu" else ["triton"]
    dense_dtypes = [torch.float32, torch.bfloat16] if dev.type == "cpu" else [torch.bfloat16]
    bandwidth = memory_bandwidth(dev)
    rows: list[KernelRow] = []
    for k, n in shapes:
        # enough distinct copies that the quantized weights alone overflow any cache (at most 256)
        copies = max(2, min(256, COLD_BYTES // max(1, k * n * bits // 8)))
        gs = group_size if group_size is None or k % group_size == 0 else next(g for g in (64, 32, 16, 8, 4, 2, 1) if k % g == 0)
        scheme = Scheme(bits=bits, group_size=gs, symmetric=False)
        logger.info(f"K={k} N={n}: group size {gs or 'per-channel'}, {copies} copies of each weight")
        dense = {dt: [torch.randn(n, k, device=dev, dtype=dt) * 0.02 for _ in range(copies)] for dt in dense_dtypes}
        layers = [_random_layer(k, n, scheme, dev, act, seed=i) for i in range(copies)]
        for m in ms:
            x = {dt: torch.randn(m, k, device=dev, dtype=dt) for dt in (torch.float32, torch.bfloat16)}
            fns: dict[str, Callable[[], Any]] = {}
            for dt, ws in dense.items():
                it = _cycle(ws)
                fns[f"dense|{str(dt).removeprefix('torch.')}"] = lambda it=it, xx=x[dt]: F.linear(xx, next(it))
            for name in quant_kernels:
                kern = kernels.by_name(name)
                it = _cycle(layers)
                fns[f"{name}|bfloat16"] = lambda it=it, kern=kern, xx=x[act]: kern(xx, next(it))
            secs = interleaved_medians(fns, rounds, dev, inner=copies)
            for key, t in secs.items():
                name, dt = key.split("|")
                if name == "dense":
                    w_bytes = k * n * (4 if dt == "float32" else 2)
                else:
                    name, w_bytes = _kernel_read(name, layers[0])
                moved = w_bytes + m * (k + n) * (4 if dt == "float32" else 2)
                rows.append(KernelRow(k, n, m, gs, name, dt, t * 1e6, 2 * m * n * k / t / 1e12, moved / t / 1e9,
                                      100 * moved / t / bandwidth, secs["dense|bfloat16"] / t))
        del dense, layers
    return {"device": _device_name(dev), "bits": bits, "group_size": group_size, "bandwidth_gbps": bandwidth / 1e9,
            "threads": torch.get_num_threads(), "rows": [asdict(r) for r in rows]}


def _kernel_read(name: str, layer: QuantLinear) -> tuple[str, int]:
    """(row label, weight bytes the kernel reads): llmq's packed buffers, or the CPU kernel's own packed copy; a
    layer the CPU ops refuse is labelled as the reference it falls back to."""
    if name == "cpu":
        packed = cpu.packed_for(layer)
        if packed.op is None:
            return "cpu (reference fallback)", _nbytes(layer.qweight, layer.scales, layer.qzeros)
        return f"cpu-{packed.op}", _nbytes(packed.weight, packed.scales, packed.offset)
    return name, _nbytes(layer.qweight, layer.scales, layer.qzeros)


def _nbytes(*tensors: torch.Tensor | None) -> int:
    """Bytes held by the given tensors (None skipped)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _cycle(items: list):
    while True:
        yield from items


# ------------------------------------------------------------------------------------------------ generate


@dataclass
class GenerateRow:
    label: str
    checkpoint: str
    dtype: str
    kernels: dict[str, int]  # which op served the QuantLinear layers (empty for a full-precision model)
    weights_mb: float  # parameters + buffers + packed kernel copies
    prefill_tok_s: float
    decode_tok_s: float
    decode_speedup: float | None = None  # vs the first row (the base in its first dtype)
    rounds: list[dict[str, float]] = field(default_factory=list)


def _model_bytes(model: torch.nn.Module) -> int:
    total = _nbytes(*model.parameters(), *model.buffers())
    for m in model.modules():
        packed = m.__dict__.get(cpu.ATTR)
        if packed is not None and packed.weight is not None:
            total += _nbytes(packed.weight, packed.scales)
    return total


def _served_by(model: torch.nn.Module) -> dict[str, int]:
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QuantLinear) and getattr(m, "serves_head", True):  # an untied quantized embedding: no matmul
            name = kernels.name_of(m.kernel)
            if name == "cpu":
                packed = m.__dict__.get(cpu.ATTR)
                op = packed.op if packed is not None else None
                name = f"cpu-{op}" if op else "cpu-reference"
            counts[name] = counts.get(name, 0) + 1
    return counts


@torch.no_grad()
def _generate_once(model, prompt: torch.Tensor, new_tokens: int, device: torch.device) -> tuple[float, float]:
    """Greedy decoding with the KV cache, as generate() does it minus logits processing: (prefill s, decode s)."""
    _sync(device)
    t0 = time.perf_counter()
    out = model(prompt, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    _sync(device)
    t1 = time.perf_counter()
    past = out.past_key_values
    for _ in range(new_tokens):
        out = model(nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    _sync(device)
    return t1 - t0, time.perf_counter() - t1


@torch.no_grad()
def _generate_static(model, prompt: torch.Tensor, new_tokens: int, device: torch.device) -> tuple[float, float]:
    """The user's path to fast generation (README, "Fast generation"): generate() with a static KV cache, greedy,
    exactly `new_tokens` tokens. (prefill s, decode s): prefill timed as a one-token generate, decode as the rest."""
    kwargs = {"do_sample": False, "cache_implementation": "static", "pad_token_id": 0}
    _sync(device)
    t0 = time.perf_counter()
    model.generate(prompt, max_new_tokens=1, min_new_tokens=1, **kwargs)
    _sync(device)
    t1 = time.perf_counter()
    model.generate(prompt, max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, **kwargs)
    _sync(device)
    return t1 - t0, max(time.perf_counter() - t1 - (t1 - t0), 1e-9)


def compile_forward(model) -> None:
    """torch.compile the model's forward (whole graph, no breaks allowed) after llmq's kernels are prepared: what the
    README tells users to do on any device (generate() compiles by itself only on accelerators)."""
    kernels.prepare(model)
    model.forward = torch.compile(model.forward, fullgraph=True)


def bench_generate(
    checkpoint: str,
    base: str | None = None,
    dtypes: tuple[str, ...] = ("float32", "bfloat16"),
    prompt_tokens: int = 128,
    new_tokens: int = 64,
    rounds: int = 5,
    device: str | None = None,
    compile: bool = False,
) -> dict[str, Any]:
    """Prefill and decode tokens/s of a checkpoint and its base, each in every dtype, timed round-robin. With
    `compile`, every model runs generate() with a static cache, eager and torch.compile'd side by side."""
    dev = torch.device(device or default_device())
    folder = resolve(checkpoint)
    if base is None:
        base = describe_checkpoint(checkpoint, folder).get("base")
    specs = ([("base", base)] if base else []) + [("quantized", checkpoint)]
    loaded = []
    for label, spec in specs:
        for dt in dtypes:
            logger.info(f"loading {spec} in {dt}")
            model = load_model(resolve(spec), dtype=DTYPES[dt]).to(dev)
            loaded.append((f"{label} {dt}", spec, dt, model))
            if compile:
                twin = load_model(resolve(spec), dtype=DTYPES[dt]).to(dev)
                compile_forward(twin)
                loaded.append((f"{label} {dt} compiled", spec, dt, twin))
    run = _generate_static if compile else _generate_once
    vocab = loaded[0][3].config.vocab_size
    prompt = torch.randint(0, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(0)).to(dev)
    for label, *_, model in loaded:  # warm-up: packed copies, allocator pools, autotuning, compilation
        logger.info(f"warm-up: {label}")
        run(model, prompt, 4, dev)
    timings: dict[str, list[tuple[float, float]]] = {row[0]: [] for row in loaded}
    for r in range(rounds):
        logger.info(f"round {r + 1}/{rounds}")
        for label, _, _, model in loaded:
            timings[label].append(run(model, prompt, new_tokens, dev))
    rows = []
    for label, spec, dt, model in loaded:
        pre = statistics.median(t[0] for t in timings[label])
        dec = statistics.median(t[1] for t in timings[label])
        rows.append(GenerateRow(label, spec, dt, _served_by(model), _model_bytes(model) / 2**20, prompt_tokens / pre,
                                new_tokens / dec, rounds=[{"prefill_s": a, "decode_s": b} for a, b in timings[label]]))
    for row in rows:
        row.decode_speedup = row.decode_tok_s / rows[0].decode_tok_s
    peak = _peak_memory_mb(dev)
    return {"device": _device_name(dev), "threads": torch.get_num_threads(), "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens, "rounds": rounds, "mode": "generate, static cache" if compile else "manual loop, dynamic cache",
            "torch": torch.__version__, "process_peak_mb": peak, "rows": [asdict(r) for r in rows]}


def _peak_memory_mb(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    import platform

    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, " \
           f"capability {torch.backends.cpu.get_cpu_capability()}"


def write_json(result: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(result, path)
    return path


def kernels_table(result: dict[str, Any]):
    from rich.table import Table

    table = Table(title=f"llmq bench kernels — W{result['bits']} (asymmetric), "
                        f"{result['device']}, copy bandwidth {result['bandwidth_gbps']:.1f} GB/s")
    for col in ("K x N", "group", "M", "kernel", "dtype", "µs", "TFLOP/s", "GB/s", "% bw", "vs dense bf16"):
        table.add_column(col, justify="left" if col in ("kernel", "dtype", "K x N") else "right")
    for r in result["rows"]:
        table.add_row(f"{r['k']}x{r['n']}", str(r["group_size"] or "channel"), str(r["m"]), r["kernel"], r["dtype"], f"{r['us']:.1f}", f"{r['tflops']:.3f}",
                      f"{r['gbps']:.1f}", f"{r['pct_bandwidth']:.0f}", f"{r['speedup_vs_bf16']:.2f}x")
    return table


def generate_table(result: dict[str, Any]):
    from rich.table import Table

    table = Table(title=f"llmq bench generate — {result['device']}; {result.get('mode', 'manual loop')}; prompt "
                        f"{result['prompt_tokens']}, decode {result['new_tokens']} tokens, median of {result['rounds']} rounds; "
                        f"process peak {result['process_peak_mb']:.0f} MB")
    for col in ("model", "kernels", "weights MB", "prefill tok/s", "decode tok/s", "decode vs first row"):
        table.add_column(col, justify="left" if col in ("model", "kernels") else "right")
    for r in result["rows"]:
        served = ", ".join(f"{k}: {v}" for k, v in r["kernels"].items()) or "dense"
        table.add_row(r["label"], served, f"{r['weights_mb']:.0f}", f"{r['prefill_tok_s']:.1f}", f"{r['decode_tok_s']:.2f}",
                      f"{r['decode_speedup']:.2f}x")
    return table
