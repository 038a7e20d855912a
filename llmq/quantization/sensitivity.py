"""How much each layer hurts the model under each candidate scheme: the numbers the budget solver (budget.py) trades.

Measured one decoder block at a time from disk, on the full-precision activations of the first few calibration
windows (one block in memory, as the block walk). For layer l of a block and candidate c:

    e_l(c) = tr(ΔW_c · H_l · ΔW_cᵀ)   (ΔW_c: the RTN error of W under c; H_l: the layer's input Hessian)

is the layer-output error that rounding predicts (GPTQ minimises the same quantity). Layers do not pass their error
on alike (an error in q_proj goes through a softmax, one in down_proj straight into the residual stream), so each
layer's prediction is calibrated by one measurement: the block is run with the layer alone at the coarsest
candidate, and the block output's error relative to its size, token by token (`relative_error`: what the next
block's RMSNorm sees), divided by that candidate's e_l, is the layer's gain g_l. Its score is s_l(c) = g_l · e_l(c),
which the solver sums over layers. On SmolLM2 the measured scores rank single-layer damage as the final-logit KL
does (Spearman 0.94 over 32 layers; the plain squared block error: 0.28; benchmarks/sensitivity_check_smollm2.py).

Per block this costs one pass to collect the Hessians on `sensitivity_samples` windows (default 8), one block
forward per layer on the first GAIN_WINDOWS windows, and an RTN of each layer per candidate: less than GPTQ's block
walk (benchmarks/results/budget_smollm2.md).

A budget that chooses the token embedding's scheme too (`budget.embedding`) gets its scores in the same unit
(`_EmbeddingProbe`): the first block's relative output error with the table at each candidate, plus, when the
output projection is tied to the table, the logits' relative error on the last hidden states.

Scores are cached in $LLMQ_CACHE/sensitivity, keyed by the base checkpoint's files, the calibration windows used,
the candidates and the clipping settings, so trying a second budget measures nothing again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import memory, numerics
from ..calibration import capture_inputs, linear_clusters
from ..checkpoint.safetensors_io import CheckpointReader, files_stamp
from ..environment import cache_dir
from ..errors import LlmqError
from ..io import write_json_atomic
from ..methods.gptq import Hessian, inverse_factor
from ..methods.rtn import quantize_weight
from ..model.structure import decoder_blocks
from ..numerics import QWeight, Scheme
from ..recipe import Recipe
from .blockwise import meta_model, unique_state_keys

logger = logging.getLogger(__name__)
CACHE_VERSION = 5
GAIN_WINDOWS = 2  # windows the gains are measured on (one block forward per layer each): a ratio needs few tokens


def relative_error(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """Mean over tokens of |Δy|² / |y|² at a block's output: the error the next block's RMSNorm sees (it normalises
    each token). The plain squared error would rank layers by the size of the residual stream, which grows with
    depth: on SmolLM2 it put 2 bits on the first blocks, whose errors the rest of the model amplifies most."""
    num = den = 0.0
    for o, r in zip(outputs, reference):
        ratio = (o - r).double().pow(2).sum(-1) / r.double().pow(2).sum(-1).clamp_min(1e-30)
        num, den = num + float(ratio.sum()), den + ratio.numel()
    return num / den


def gptq_column_weights(H: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """1 / d_j² per input column, d = the diagonal of the upper Cholesky factor of GPTQ's damped inverse Hessian:
    GPTQ's loss is Σ (w - q)² / d_j² over the columns it rounds, each column's rounding error compensated by the
    columns after it. With the RTN error in place of GPTQ's (same grid, same spread) this predicts the layer error
    GPTQ leaves, which for layers with correlated inputs is far below the RTN error tr(ΔW H ΔWᵀ)."""
    H = H.clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    U, _ = inverse_factor(H, recipe.method.damp)
    return U.diagonal().pow(-2)


@dataclass(frozen=True)
class EmbeddingCandidates:
    """The token embedding as a budget choice: its name, the head tied to it (or None), the candidate schemes (None =
    full precision)."""

    name: str
    tied_head: str | None
    schemes: tuple[Scheme | None, ...]


def cache_key(recipe: Recipe, base_dir: Path, windows: torch.Tensor, cands: list[Scheme], layers: list[str],
              scale_dtype: torch.dtype, embedding: EmbeddingCandidates | None = None) -> str:
    m = recipe.method
    parts = {
        "version": CACHE_VERSION, "base": files_stamp(base_dir), "layers": sorted(layers),
        "windows": hashlib.sha256(windows.to(torch.int64).numpy().tobytes()).hexdigest(), "shape": list(windows.shape),
        "batch_size": recipe.calibration.batch_size,
        "candidates": [[c.bits, c.group_size, c.symmetric] for c in cands],
        "clip": [m.clip, m.clip_grid, m.clip_max_shrink, m.clip_norm], "scale_dtype": str(scale_dtype).removeprefix("torch."),
        "gptq": [m.init_method == "gptq", m.damp],
    }
    if m.gguf_grid:  # (only when set: the keys of existing caches stay as they were)
        parts["gguf_grid"] = True
    if embedding is not None:
        parts["embedding"] = [embedding.name, embedding.tied_head,
                              [None if c is None else [c.bits, c.group_size, c.symmetric] for c in embedding.schemes]]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def measure(recipe: Recipe, base_dir: Path, calibration: torch.Tensor, cands: list[Scheme], layers: list[str],
            scale_dtype: torch.dtype, device: torch.device, embedding: EmbeddingCandidates | None = None,
            ) -> tuple[dict[str, list[float | None]], dict]:
    """{layer: [score per candidate, None where it does not fit]} for the named layers (all inside the decoder
    blocks) — and, given `embedding`, {its name: [score per embedding candidate]} — and facts about the measurement:
    seconds, windows, whether it came from the cache, and `clusters` (the first block's Linear layers grouped by
    shared input, block-relative names: q/k/v, gate/up)."""
    windows = calibration[: recipe.scheme.budget.sensitivity_samples]
    key = cache_key(recipe, base_dir, windows, cands, layers, scale_dtype, embedding)
    path = cache_dir() / "sensitivity" / f"{key}.json"
    expected = set(layers) | ({embedding.name} if embedding else set())
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            if set(saved["scores"]) == expected:
                logger.info(f"sensitivity: reusing the measurement in {path}")
                return saved["scores"], {**saved["facts"], "cached": str(path)}
        except (OSError, ValueError, KeyError):
            pass  # an unreadable cache entry is measured again
    t0 = time.perf_counter()
    scores, clusters = _measure(recipe, base_dir, windows, cands, set(layers), scale_dtype, device, embedding)
    facts = {"seconds": round(time.perf_counter() - t0, 2), "windows": list(windows.shape), "clusters": clusters,
             "method": "rtn error x input Hessian, calibrated per layer by the relative block-output error"}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic({"scores": scores, "facts": facts}, path)
    return scores, {**facts, "cached": None}


@torch.no_grad()
def _measure(recipe: Recipe, base_dir: Path, windows: torch.Tensor, cands: list[Scheme], wanted: set[str],
             scale_dtype: torch.dtype, device: torch.device, embedding: EmbeddingCandidates | None = None,
             ) -> tuple[dict[str, list[float | None]], list[list[str]]]:
    _, model = meta_model(base_dir)
    prefix, blocks = decoder_blocks(model)
    outside = sorted(n for n in wanted if not n.startswith(prefix + "."))
    if outside:  # budget.plan_budget refuses these before any work
        raise LlmqError(f"sensitivity: {outside[0]} lies outside the decoder blocks; it cannot be measured")
    reader = CheckpointReader(base_dir)
    rest = unique_state_keys(model, skip_prefix=prefix + ".")
    reader.materialize(model, "", rest, device)
    inputs = capture_inputs(model, blocks[0], list(torch.split(windows, recipe.calibration.batch_size)), device)
    probe = capture_inputs(model, blocks[0], [windows[:GAIN_WINDOWS]], device)  # the gains' block forwards
    table = _EmbeddingProbe.start(model, blocks[0], windows[:GAIN_WINDOWS], embedding, recipe, scale_dtype, device)
    model.to("meta")
    scores: dict[str, list[float | None]] = {}
    clusters: list[list[str]] = []
    gptq = recipe.method.init_method == "gptq"
    for i, block in enumerate(tqdm(blocks, desc="sensitivity", unit="block", leave=False)):
        names = [n for n, m in block.named_modules() if f"{prefix}.{i}.{n}" in wanted]
        reader.materialize(block, f"{prefix}.{i}.", unique_state_keys(block), device)
        if i == 0:
            clusters = linear_clusters(block, probe)
        hessians = {n: Hessian(block.get_submodule(n).in_features, device) for n in names}
        inputs.feed(block, {block.get_submodule(n): hessians[n].add for n in names}, stop_after=None)
        reference = probe.outputs(block)
        if table is not None and i == 0:
            table.score_input(block, reference)
        for n in names:
            layer = block.get_submodule(n)
            w = layer.weight.data.clone()
            fit = [c for c in range(len(cands)) if cands[c].fits(w.shape[1])]
            coarsest = max(fit, key=lambda c: (-cands[c].bits, cands[c].group_size or 1 << 30))
            rtn_error: list[float | None] = [None] * len(cands)  # None: the candidate does not fit the layer
            predicted: list[float | None] = [None] * len(cands)
            column_weight = gptq_column_weights(hessians[n].H, recipe) if gptq else None
            for c in fit:
                dw = numerics.dequantize(quantize_weight(w, cands[c], recipe.method, scale_dtype), cands[c]) - w
                rtn_error[c] = float(((dw @ hessians[n].H) * dw).sum())
                predicted[c] = rtn_error[c] if column_weight is None else float((dw.pow(2) * column_weight).sum())
            layer.weight.data = numerics.dequantize(quantize_weight(w, cands[coarsest], recipe.method, scale_dtype),
                                                    cands[coarsest])
            measured = relative_error(probe.outputs(block), reference)
            layer.weight.data = w
            gain = measured / rtn_error[coarsest] if rtn_error[coarsest] > 0 else 0.0  # measured with RTN weights
            scores[f"{prefix}.{i}.{n}"] = [None if e is None else gain * e for e in predicted]
        del hessians
        if i + 1 < len(blocks):
            inputs.advance(block)
            probe.advance(block)
        elif table is not None:
            table.score_output(model, reader, reference, device)
        del reference
        block.to("meta")
        memory.trim()
    if table is not None:
        scores[embedding.name] = table.scores
    return scores, clusters


@dataclass
class _EmbeddingProbe:
    """The token embedding's score per candidate, in the layers' unit (a relative error, token by token, of what the
    next stage reads): on the input side, the first block's output error with the table at the candidate (measured
    directly, as the layers' gains are); for a tied head, also the logits' relative error, h·ΔWᵀ against h·Wᵀ, on
    the full-precision model's final normed hidden states h."""

    candidates: EmbeddingCandidates
    tables: list[QWeight | None]  # each candidate's table as integers (None: full precision), 4x smaller than floats
    fed: list[Any]  # the first block's inputs with each candidate's table (None: full precision)
    scores: list[float | None]  # None: the candidate does not fit the table's width (not offered)

    @classmethod
    def start(cls, model, first_block, windows: torch.Tensor, embedding: EmbeddingCandidates | None, recipe: Recipe,
              scale_dtype: torch.dtype, device) -> _EmbeddingProbe | None:
        if embedding is None:
            return None
        table = model.get_submodule(embedding.name)
        w = table.weight.data
        tables, fed = [], []
        for c in embedding.schemes:
            offered = c is not None and c.fits(w.shape[1])  # a candidate that does not fit is not offered
            qw = quantize_weight(w, c, recipe.method, scale_dtype) if offered else None
            if qw is not None:
                table.weight.data = numerics.dequantize(qw, c)
                fed.append(capture_inputs(model, first_block, [windows], device))
                table.weight.data = w
            else:
                fed.append(None)
            tables.append(qw)
        scores = [None if c is not None and qw is None else 0.0 for c, qw in zip(embedding.schemes, tables)]
        return cls(embedding, tables, fed, scores)

    def score_input(self, block, reference: list[torch.Tensor]) -> None:
        for c, inputs in enumerate(self.fed):
            if inputs is not None:
                self.scores[c] += relative_error(inputs.outputs(block), reference)
        self.fed = []

    def score_output(self, model, reader: CheckpointReader, last_outputs: list[torch.Tensor], device) -> None:
        if self.candidates.tied_head is None:
            return
        norm = getattr(model.get_decoder(), "norm", None)
        if norm is None:
            raise LlmqError(f"sensitivity: {type(model).__name__} has no final norm (model.norm) before its tied head")
        keys = [k for k in unique_state_keys(model) if k.startswith(self.candidates.name + ".")]
        keys += [k for k, _ in norm.named_parameters(prefix=_name_of(model, norm))]
        reader.materialize(model, "", keys, device)
        w = model.get_submodule(self.candidates.name).weight.data
        h = [norm(o) for o in last_outputs]
        reference = [x @ w.t() for x in h]
        for c, qw in enumerate(self.tables):
            if qw is not None:
                dq = numerics.dequantize(qw, self.candidates.schemes[c])
                self.scores[c] += relative_error([x @ dq.t() for x in h], reference)


def _name_of(model, module) -> str:
    return next(n for n, m in model.named_modules() if m is module)
