"""Quantize a model one decoder block at a time, from memory or straight from its safetensors files on disk.

`quantize_checkpoint` is what `llmq run` uses: the model is built on the meta device, and only the current
block (and the calibration activations flowing through it) is ever materialized, read lazily from the base
checkpoint's safetensors files — so the largest model llmq can quantize is bounded by disk, not by RAM or VRAM.
Each finished block is written as its own safetensors shard, with the activations it produced and a small
progress file, so a killed run resumes at the next block and ends with the same bytes as an uninterrupted
one. `quantize_model` runs the same walk over a model already in memory (the Python API).

Methods (methods/) decide what each block's Linear layers become; calibration/capture.py captures and feeds the
activations; resume.py says whether a partial folder belongs to this run; this file only walks, loads and writes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm.auto import tqdm

from .. import memory, numerics
from ..calibration import capture_inputs, linear_clusters
from ..checkpoint.config import EmbeddingPlan, LlmqConfig
from ..checkpoint.safetensors_io import CheckpointReader, write_index
from ..checkpoint.safetensors_io import save_safetensors_atomic as _save_atomic
from ..environment import default_device
from ..errors import BadInputError, LlmqError
from ..io import torch_save_atomic
from ..io import write_json_atomic as _write_json_atomic
from ..methods import BlockJob, block_method
from ..methods.qat.block_ap import StepBudget
from ..methods.rtn import quantize_weight, rtn_block
from ..model.structure import decoder_blocks, input_embedding, targeted_linears
from ..numerics import QWeight, Scheme
from ..recipe import Recipe, check_against_layers
from .resume import (
    ACTIVATIONS,
    PROGRESS,
    blocks_done,
    planned_block_steps,
    planned_step_seconds,
    run_key,
    spent_block_seconds,
)

logger = logging.getLogger(__name__)


@dataclass
class QuantizeSummary:
    layers: list[str]  # full names of the quantized Linear layers
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per layer: block, layer, method, loss, damp, seconds
    has_g_idx: bool = False
    resumed_at_block: int = 0
    seconds: float = 0.0
    schemes: dict[str, Scheme] = field(default_factory=dict)  # each quantized layer's scheme
    skipped: list[str] = field(default_factory=list)  # targeted layers kept in full precision by an override
    embedding: EmbeddingPlan | None = None  # the token embedding, when scheme.embedding quantizes it
    embedding_qweight: QWeight | None = None  # its integers (in-memory walks; the disk walk writes them to a shard)


@dataclass
class _Plan:
    prefix: str  # qualified name of the decoder block list, e.g. "model.layers"
    blocks: nn.ModuleList
    per_block: list[list[str]]  # targeted Linear names inside each block, relative to the block
    outside: list[str]  # targeted Linear layers outside the blocks (quantized with RTN: no activations reach them)
    has_g_idx: bool
    schemes: dict[str, Scheme]  # every quantized layer's scheme, by full name
    skipped: list[str]  # targeted layers an override keeps in full precision
    embedding: EmbeddingPlan | None  # the token embedding, when the recipe quantizes it

    def block_schemes(self, i: int | None) -> dict[str, Scheme]:
        """Block i's layer schemes by block-relative name (i None: the layers outside the blocks, by full name)."""
        if i is None:
            return {n: self.schemes[n] for n in self.outside}
        return {n: self.schemes[f"{self.prefix}.{i}.{n}"] for n in self.per_block[i]}


def _plan(model: nn.Module, recipe: Recipe) -> _Plan:
    if block_method(recipe.method) is None:
        raise LlmqError(f"method {recipe.method.name} trains the whole model; it has no block-by-block walk")
    layers = targeted_linears(model, recipe.targets, recipe.ignore)
    schemes = check_against_layers(recipe, {n: m.in_features for n, m in layers.items()})
    skipped = [n for n in layers if n not in schemes]
    layers = {n: m for n, m in layers.items() if n in schemes}
    prefix, blocks = decoder_blocks(model)
    per_block = [[n.removeprefix(f"{prefix}.{i}.") for n in layers if n.startswith(f"{prefix}.{i}.")] for i in range(len(blocks))]
    outside = [n for n in layers if not n.startswith(f"{prefix}.")]
    return _Plan(prefix, blocks, per_block, outside, stores_g_idx(recipe, schemes.values()), schemes, skipped,
                 embedding_plan(recipe, model))


def embedding_plan(recipe: Recipe, model: nn.Module) -> EmbeddingPlan | None:
    """The token embedding `scheme.embedding` quantizes (and the head tied to it), its group size checked."""
    if recipe.scheme.embedding is None:
        return None
    name, tied = input_embedding(model)
    scheme = recipe.scheme.embedding.to_scheme()
    dim = model.get_submodule(name).embedding_dim
    if not scheme.fits(dim):
        raise BadInputError(f"scheme.embedding.group_size: {scheme.group_size} does not divide the embedding width {dim} "
                            f"of {name} (try a divisor of {dim}, or null for one group per row)")
    return EmbeddingPlan(name, scheme, tied)


def quantize_embedding(model: nn.Module, recipe: Recipe, plan: EmbeddingPlan, scale_dtype: torch.dtype) -> QWeight:
    """RTN of the token embedding (rows = tokens, groups along the hidden dimension), with the recipe's clipping. The
    model's table becomes the dequantized one, so every block calibrates on what the quantized model will feed it."""
    emb = model.get_submodule(plan.name)
    with torch.no_grad():
        qw = quantize_weight(emb.weight.data, plan.scheme, recipe.method, scale_dtype)
        emb.weight.data.copy_(numerics.dequantize(qw, plan.scheme, emb.weight.dtype))
    return qw


def stores_g_idx(recipe: Recipe, schemes) -> bool:
    """Whether the checkpoint stores g_idx (for every layer): GPTQ act order with groups formed in that order."""
    m = recipe.method
    return m.init_method == "gptq" and m.act_order and not m.static_groups and any(s.group_size is not None for s in schemes)


def _batches(calibration: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(torch.split(calibration, batch_size))


def _job(recipe: Recipe, scale_dtype: torch.dtype, inputs, clusters, rows: list, block: str, log,
         schemes: dict[str, Scheme], step_budget: StepBudget | None = None, blocks_left: int = 1) -> BlockJob:
    def record(row: dict[str, Any]) -> None:
        row = {"block": block, **row}
        rows.append(row)
        log(row)

    default = recipe.scheme.to_scheme()
    own = {n: s for n, s in schemes.items() if s != default}
    return BlockJob(default, recipe.method, scale_dtype, inputs, clusters, record, own, step_budget=step_budget,
                    blocks_left=blocks_left)


def step_budget(recipe: Recipe, n_blocks: int, started: float, steps: int | None = None,
                step_s: float | None = None) -> StepBudget | None:
    """Block-wise QAT's `block_minutes` as a StepBudget (None for every other method); `steps` / `step_s`: a resumed
    plan and the step time it was made from."""
    minutes = recipe.method.block_minutes if recipe.method.blockwise else None
    return None if minutes is None else StepBudget(minutes * 60, n_blocks, started, steps, step_s)


def _with_default_g_idx(qweights: dict[str, QWeight], schemes: dict[str, Scheme]) -> dict[str, QWeight]:
    """When the checkpoint stores g_idx, every layer needs one; layers quantized without act order get the trivial one."""
    return {
        n: qw if qw.g_idx is not None else qw._replace(g_idx=numerics.default_g_idx(qw.q.shape[1], schemes[n], qw.q.device))
        for n, qw in qweights.items()
    }


def _reference(model: nn.Module, plan: _Plan, method, batches: list[torch.Tensor], device) -> list[torch.Tensor] | None:
    """The full-precision stream's first-block inputs, for a method that trains against the full-precision model,
    when the token table is about to be quantized (captured before it is); None otherwise (the quantized stream's
    first inputs are then the full-precision ones, copied by `keep_reference`)."""
    if not (method.needs_reference and plan.embedding is not None and batches):
        return None
    return capture_inputs(model, plan.blocks[0], batches, device).hidden


def _quantize_block(method, block: nn.Module, names: list[str], job: BlockJob) -> dict[str, QWeight]:
    """One block through the method; a method that trains against the full-precision model (`needs_reference`)
    gets the block's outputs on the full-precision stream, taken before the block is quantized, as `job.targets`."""
    if job.inputs is not None and method.needs_reference:
        job.targets = job.inputs.reference_outputs(block)
    return method.quantize_block(block, names, job)


def _advance(method, block: nn.Module, job: BlockJob) -> None:
    """The block's calibration activations become the next block's: the quantized stream through the quantized
    block, and the full-precision stream (if kept) is the block's outputs computed before it was quantized."""
    if not job.advanced:  # block-wise QAT advances the stream itself, in the pass that measures its error after
        job.inputs.advance(block)
    if method.needs_reference:
        job.inputs.reference = job.targets


# ------------------------------------------------------------------------------------------- in memory


def quantize_model(
    model: nn.Module, recipe: Recipe, scale_dtype: torch.dtype, calibration: torch.Tensor | None = None, log=lambda row: None
) -> tuple[dict[str, QWeight], QuantizeSummary]:
    """Walk a model already in memory block by block; returns {full layer name: QWeight}. Calibrating methods
    leave the dequantized weights in the model's Linear layers (the caller swaps them for QuantLinear)."""
    t0 = time.perf_counter()
    plan, method = _plan(model, recipe), block_method(recipe.method)
    summary = QuantizeSummary(layers=[], has_g_idx=plan.has_g_idx, schemes=plan.schemes, skipped=plan.skipped,
                              embedding=plan.embedding)
    if method.needs_calibration and calibration is None:
        raise LlmqError(f"method {recipe.method.name} needs calibration token windows")
    batches = _batches(calibration, recipe.calibration.batch_size) if method.needs_calibration else []
    device = next(model.parameters()).device
    reference = _reference(model, plan, method, batches, device)
    if plan.embedding is not None:
        summary.embedding_qweight = quantize_embedding(model, recipe, plan.embedding, scale_dtype)
    inputs = clusters = None
    if method.needs_calibration:
        inputs = capture_inputs(model, plan.blocks[0], batches, device)
        if method.needs_reference:
            inputs.keep_reference(reference)
        clusters = linear_clusters(plan.blocks[0], inputs)
    qweights: dict[str, QWeight] = {}
    budget, n_blocks = step_budget(recipe, len(plan.blocks), t0), len(plan.blocks)
    for i, block in enumerate(tqdm(plan.blocks, desc=f"{recipe.method.name} blocks", unit="block", leave=False)):
        job = _job(recipe, scale_dtype, inputs, clusters, summary.rows, str(i), log, plan.block_schemes(i), budget,
                   n_blocks - i)
        for name, qw in _quantize_block(method, block, plan.per_block[i], job).items():
            qweights[f"{plan.prefix}.{i}.{name}"] = qw
        if inputs is not None and i + 1 < len(plan.blocks):
            _advance(method, block, job)
    if plan.outside:
        outside_job = _job(recipe, scale_dtype, None, None, summary.rows, "-", log, plan.block_schemes(None))
        qweights.update(rtn_block(model, plan.outside, outside_job))
    if plan.has_g_idx:
        qweights = _with_default_g_idx(qweights, plan.schemes)
    summary.layers = list(qweights)
    summary.seconds = time.perf_counter() - t0
    return qweights, summary


# ------------------------------------------------------------------------------------------------ on disk


def unique_state_keys(module: nn.Module, skip_prefix: str | None = None) -> list[str]:
    """state_dict keys of `module`, tied tensors once (the first name, as save_pretrained keeps it)."""
    seen, keys = set(), []
    for k, t in module.state_dict(keep_vars=True).items():
        if skip_prefix is not None and k.startswith(skip_prefix):
            continue
        if id(t) not in seen:
            seen.add(id(t))
            keys.append(k)
    return keys


def _shard_tensors(
    module: nn.Module, prefix: str, keys: list[str], qweights: dict[str, QWeight], schemes: dict[str, Scheme],
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """What one shard holds: packed tensors for the quantized layers, everything else with floating parameters
    cast to `dtype` (buffers keep theirs), as save_pretrained would write them."""
    params = {n for n, _ in module.named_parameters(remove_duplicate=False)}
    tensors = {}
    state = module.state_dict()
    for k in keys:
        layer, _, leaf = k.rpartition(".")
        if layer in qweights and leaf == "weight":
            continue
        t = state[k]
        tensors[prefix + k] = (t.to(dtype) if k in params and t.is_floating_point() else t).detach().cpu().contiguous()
    for layer, qw in qweights.items():
        for leaf, t in numerics.pack_qweight(qw, schemes[layer], dtype).items():
            tensors[f"{prefix}{layer}.{leaf}"] = t.cpu().contiguous()
    return tensors


def _finish_block(work: Path, shard: str, tensors: dict, activations: list | None, progress: dict) -> None:
    """Make a finished block durable: its shard, the activations the next block starts from, then the progress
    record that points at both (a crash between the steps only means redoing this block). Activations are an
    internal resume file written with torch.save, which streams tensor storage to disk without the full in-memory
    copy safetensors' writer makes (75 MB per block on SmolLM2)."""
    _save_atomic(tensors, work / shard)
    if activations is not None:
        torch_save_atomic(activations, work / ACTIVATIONS)
    _write_json_atomic(progress, work / PROGRESS)


def meta_model(base_dir: Path) -> tuple[Any, nn.Module]:
    """(config, model) of the checkpoint in `base_dir`, built with parameters on the meta device (computed buffers
    such as rotary inv_freq stay real), tied weights tied: the skeleton a walk from disk materializes part by part."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_dir)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.tie_weights()  # init_empty_weights leaves tied embeddings as two meta tensors
    return config, model


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def quantize_checkpoint(
    recipe: Recipe,
    base_dir: Path,
    work: Path,
    scale_dtype: torch.dtype,
    calibration: torch.Tensor | None = None,
    log: Callable[[dict[str, Any]], None] = lambda row: None,
    device: str | torch.device | None = None,
) -> QuantizeSummary:
    """Quantize the checkpoint in `base_dir` block by block into the folder `work` (shards + index + config.json).

    `work` may hold an interrupted run of the same recipe: finished blocks are kept and the walk resumes at the
    next one from the saved activations. Anything else found there is an error, never silently reused.
    """
    t0 = time.perf_counter()
    memory.trim()
    walk = _DiskWalk.start(recipe, Path(base_dir), work, scale_dtype, torch.device(device or default_device()),
                           run_key(recipe, base_dir, calibration), log, t0)
    inputs = walk.first_block_inputs(calibration)
    walk.write_outside_blocks()
    walk.add_finished_blocks()
    walk.quantize_blocks(inputs)
    _write_metadata(work, base_dir, walk.config, recipe, walk.weight_map, scale_dtype, walk.plan)
    walk.summary.seconds = time.perf_counter() - t0
    return walk.summary


@dataclass
class _DiskWalk:
    """The walk from disk: the model as a meta skeleton, materialized one part at a time from `reader`; each
    finished part written as a shard of `work` (the blocks in order, what lies outside them last)."""

    recipe: Recipe
    work: Path
    config: Any  # the base model's transformers config (config.json of the result)
    model: nn.Module
    plan: _Plan
    reader: CheckpointReader
    scale_dtype: torch.dtype
    device: torch.device
    key: str  # resume.run_key
    done: int  # blocks an interrupted run of the same key finished
    log: Callable[[dict[str, Any]], None]
    summary: QuantizeSummary
    weight_map: dict[str, str] = field(default_factory=dict)  # tensor name -> shard, for the index
    rest_keys: list[str] = field(default_factory=list)  # state keys outside the blocks (the last shard)
    step_budget: StepBudget | None = None  # block-wise QAT's time budget as steps per block

    @classmethod
    def start(cls, recipe: Recipe, base_dir: Path, work: Path, scale_dtype: torch.dtype, device: torch.device, key: str,
              log, started: float) -> _DiskWalk:
        config, model = meta_model(base_dir)
        plan = _plan(model, recipe)
        reader = CheckpointReader(base_dir)
        done = blocks_done(work, key, len(plan.blocks))
        if done:
            logger.info(f"resuming at block {done} of {len(plan.blocks)} from {work}")
        summary = QuantizeSummary(layers=[], has_g_idx=plan.has_g_idx, resumed_at_block=done, schemes=plan.schemes,
                                  skipped=plan.skipped, embedding=plan.embedding)
        if done:  # the budget covers the whole method: what the interrupted run spent counts
            started -= spent_block_seconds(work)
        budget = step_budget(recipe, len(plan.blocks), started, *((planned_block_steps(work), planned_step_seconds(work))
                                                                   if done else (None, None)))
        return cls(recipe, work, config, model, plan, reader, scale_dtype, device, key, done, log, summary,
                   step_budget=budget)

    @property
    def method(self):
        return block_method(self.recipe.method)

    def shard(self, i: int) -> str:
        """Block i's shard; the one after the last block holds everything outside the blocks."""
        return shard_name(i, len(self.plan.blocks) + 1)

    def first_block_inputs(self, calibration: torch.Tensor | None):
        """Materialize what lies outside the blocks (embeddings first) and, for a calibrating method, capture the
        first block's inputs, or take the saved activations of the block to resume at."""
        self.rest_keys = unique_state_keys(self.model, skip_prefix=f"{self.plan.prefix}.")
        self.reader.materialize(self.model, "", self.rest_keys, self.device)
        if self.method.needs_calibration and calibration is None:
            raise LlmqError(f"method {self.recipe.method.name} needs calibration token windows")
        batches = _batches(calibration, self.recipe.calibration.batch_size) if self.method.needs_calibration else []
        reference = _reference(self.model, self.plan, self.method, batches, self.device)
        if self.plan.embedding is not None:
            self.summary.embedding_qweight = quantize_embedding(self.model, self.recipe, self.plan.embedding,
                                                                self.scale_dtype)
        if not self.method.needs_calibration:
            return None
        inputs = capture_inputs(self.model, self.plan.blocks[0], batches, self.device)
        if self.method.needs_reference:
            inputs.keep_reference(reference)
        if self.done > 0:
            try:
                saved = torch.load(self.work / ACTIVATIONS, map_location=self.device, weights_only=True)
            except Exception as e:  # noqa: BLE001 - missing, truncated or foreign: all mean "cannot resume from it"
                raise LlmqError(f"{self.work / ACTIVATIONS}: unreadable ({type(e).__name__}); remove {self.work} to start "
                                "over") from None
            expected = [h.shape for h in inputs.hidden + (inputs.reference or [])]  # what a resume file of this run holds
            if (not isinstance(saved, list) or len(saved) != len(expected)
                    or any(not isinstance(a, torch.Tensor) or a.shape != shape for a, shape in zip(saved, expected))):
                raise LlmqError(f"{self.work / ACTIVATIONS}: saved activations do not match this run's calibration batches")
            n = len(inputs.hidden)
            inputs = inputs.with_hidden(saved[:n], saved[n:] if inputs.reference is not None else None)
        return inputs

    def write_outside_blocks(self) -> None:
        """RTN for targeted layers outside the blocks (no activations reach them); the last shard; then they go."""
        outside_q = {}
        if self.plan.outside:
            outside = self.plan.block_schemes(None)
            job = _job(self.recipe, self.scale_dtype, None, None, self.summary.rows, "-", self.log, outside)
            outside_q = rtn_block(self.model, self.plan.outside, job)
            if self.plan.has_g_idx:
                outside_q = _with_default_g_idx(outside_q, outside)
            self.summary.layers += list(outside_q)
        schemes = self.plan.block_schemes(None)
        if self.plan.embedding is not None:
            outside_q[self.plan.embedding.name] = self.summary.embedding_qweight
            schemes[self.plan.embedding.name] = self.plan.embedding.scheme
            self.summary.embedding_qweight = None  # written to the shard below; not kept for the rest of the walk
        rest = _shard_tensors(self.model, "", self.rest_keys, outside_q, schemes, self.scale_dtype)
        last = self.shard(len(self.plan.blocks))
        _save_atomic(rest, self.work / last)
        self.weight_map.update(dict.fromkeys(rest, last))
        del rest
        self.model.to("meta")  # embeddings are not needed again
        memory.trim()

    def add_finished_blocks(self) -> None:
        """The shards an earlier, interrupted run finished, into the index and the summary."""
        for i in range(self.done):
            try:
                with safe_open(self.work / self.shard(i), framework="pt") as fh:
                    self.weight_map.update(dict.fromkeys(fh.keys(), self.shard(i)))
            except (SafetensorError, OSError) as e:
                raise LlmqError(f"{self.work / self.shard(i)}: a finished block's shard is unreadable ({e}); remove "
                                f"{self.work} to start over") from None
            self.summary.layers += [f"{self.plan.prefix}.{i}.{n}" for n in self.plan.per_block[i]]

    def quantize_blocks(self, inputs) -> None:
        """Every block not yet done: materialize, quantize, write (one background thread writes shard, activations,
        then progress, in that order, while the next block computes; leaving the `with` waits for the last write,
        also on Ctrl-C)."""
        n_blocks, clusters = len(self.plan.blocks), None
        with ThreadPoolExecutor(max_workers=1) as writer:
            pending = None
            bar = tqdm(range(self.done, n_blocks), desc=f"{self.recipe.method.name} blocks", unit="block",
                       initial=self.done, total=n_blocks)
            for i in bar:
                block, prefix = self.plan.blocks[i], f"{self.plan.prefix}.{i}."
                block_keys = unique_state_keys(block)
                self.reader.materialize(block, prefix, block_keys, self.device)
                if clusters is None and inputs is not None:
                    clusters = linear_clusters(block, inputs)
                schemes = self.plan.block_schemes(i)
                job = _job(self.recipe, self.scale_dtype, inputs, clusters, self.summary.rows, str(i), self.log, schemes,
                           self.step_budget, n_blocks - i)
                qweights = _quantize_block(self.method, block, self.plan.per_block[i], job)
                if self.plan.has_g_idx:
                    qweights = _with_default_g_idx(qweights, schemes)
                tensors = _shard_tensors(block, prefix, block_keys, qweights, schemes, self.scale_dtype)
                self.weight_map.update(dict.fromkeys(tensors, self.shard(i)))
                self.summary.layers += [prefix + n for n in qweights]
                if pending is not None:
                    pending.result()  # the previous write holds the activations about to be overwritten
                activations = None
                if inputs is not None and i + 1 < n_blocks:
                    _advance(self.method, block, job)
                    activations = inputs.saved()
                block.to("meta")
                progress = {"run": self.key, "blocks_done": i + 1, "n_blocks": n_blocks}
                if self.step_budget is not None:  # the plan for the next block, and the time spent so far
                    progress["block_steps"] = self.step_budget.steps
                    progress["block_step_seconds"] = self.step_budget.step_s
                    progress["block_seconds_spent"] = round(time.perf_counter() - self.step_budget.started, 3)
                trained = [r for r in self.summary.rows if r["block"] == str(i) and "init_loss" in r]
                if trained:
                    bar.set_postfix_str(f"block loss {trained[0]['init_loss']:.4g} → {trained[0]['loss']:.4g}")
                pending = writer.submit(_finish_block, self.work, self.shard(i), tensors, activations, progress)
                memory.trim()
            if pending is not None:
                pending.result()


def _write_metadata(work: Path, base_dir: Path, config, recipe: Recipe, weight_map: dict, dtype, plan: _Plan) -> None:
    """The last step: index, config.json with the llmq quantization_config, generation config; resume files go."""
    write_index(work, weight_map)
    config.quantization_config = LlmqConfig.from_scheme(recipe.scheme.to_scheme(), recipe.targets, recipe.ignore,
                                                        plan.has_g_idx, plan.schemes, plan.skipped, plan.embedding)
    config.dtype = dtype
    config.save_pretrained(work)
    if (Path(base_dir) / "generation_config.json").is_file():
        (work / "generation_config.json").write_bytes((Path(base_dir) / "generation_config.json").read_bytes())
    for f in (ACTIVATIONS, PROGRESS):
        (work / f).unlink(missing_ok=True)

