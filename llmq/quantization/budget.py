"""The best assignment of schemes to layers under a size budget (`scheme.budget` in a recipe).

Each layer can take one of a few candidate schemes; each choice costs bits on disk (exactly what llmq stores,
`numerics.stored_bits`) and adds a measured sensitivity (sensitivity.py). `solve` minimises the summed sensitivity
with the total size at most the budget: a multiple-choice knapsack, solved exactly by dynamic programming over the
size in units of budget / `RESOLUTION` (each layer's size rounded *up* to whole units, so the result can never exceed
the budget; the rounding costs at most one unit per layer). A Lagrangian search is the usual shortcut, but it only
reaches assignments on the convex hull of the trade-off and leaves budget unspent; the DP is exact for the rounded
sizes and takes well under a second for hundreds of layers.

`plan_budget` turns a recipe's budget into bits available for the layers it chooses (bits per weight over the
targeted layers, or the size of the whole checkpoint), and `assign` writes the choice back as a recipe whose
overrides name every layer (the recipe saved beside the checkpoint reproduces it without measuring again).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import BadInputError
from ..model.structure import decoder_blocks, input_embedding, skeleton, targeted_linears
from ..numerics import Scheme, stored_bits
from ..recipe import Recipe, SchemeConfig, check_against_layers
from ..recipe.scheme import EmbeddingScheme, LayerOverride
from ..recipe.targets import matches
from . import sensitivity
from .blockwise import embedding_plan, stores_g_idx
from .sensitivity import EmbeddingCandidates

RESOLUTION = 200_000  # size units the budget is cut into

DEFAULT_CANDIDATE_BITS = (2, 3, 4, 8)  # 5 and 6 bits are candidates when named


def solve(sizes: list[list[int | None]], scores: list[list[float]], budget: int) -> list[int]:
    """For each layer i, the index of its candidate (sizes[i][c] bits, None where the candidate does not fit the
    layer; scores[i][c] sensitivity) such that the summed score is least with sum of sizes <= budget. Raises
    BadInputError when even the smallest choices do not fit."""
    least = sum(_smallest(s) for s in sizes)
    if least > budget:
        raise BadInputError(f"the budget ({budget} bits) is below the smallest assignment of the candidates ({least} bits)")
    unit = max(1, math.ceil(budget / RESOLUTION))
    cap = budget // unit
    inf = np.inf
    best = np.full(cap + 1, inf)  # best[u]: least score with rounded size exactly u units
    best[0] = 0.0
    choice = np.zeros((len(sizes), cap + 1), dtype=np.int16)
    for i, (size_i, score_i) in enumerate(zip(sizes, scores)):
        new = np.full(cap + 1, inf)
        for c, (bits, score) in enumerate(zip(size_i, score_i)):
            if bits is None:
                continue
            w = -(-bits // unit)
            if w > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[w:] = best[: cap + 1 - w] + score
            better = cand < new  # strict: ties keep the earlier candidate
            new[better] = cand[better]
            choice[i, better] = c
        best = new
    if not np.isfinite(best).any():
        raise BadInputError(f"the budget ({budget} bits) leaves no room once each layer's size is rounded up to {unit} "
                            "bits; raise it slightly")
    u = int(np.argmin(best))  # least score; among equal scores the smallest size
    picks = []
    for i in range(len(sizes) - 1, -1, -1):
        c = int(choice[i, u])
        picks.append(c)
        u -= -(-sizes[i][c] // unit)
    return picks[::-1]


def _smallest(sizes: list[int | None]) -> int:
    return min(b for b in sizes if b is not None)


def candidates(recipe: Recipe) -> list[Scheme]:
    """The budget's candidate schemes (default: 2, 3, 4 and 8 bits with the recipe scheme's grouping and symmetry)."""
    b, s = recipe.scheme.budget, recipe.scheme
    if b.candidates is not None:
        return [c.to_scheme() for c in b.candidates]
    return [SchemeConfig(bits=bits, group_size=s.group_size, symmetric=s.symmetric).to_scheme() for bits in DEFAULT_CANDIDATE_BITS]


def label(s: Scheme) -> str:
    """W3g64, W4g128-sym, W8 (per channel): the short name a candidate is written with."""
    return f"W{s.bits}" + (f"g{s.group_size}" if s.group_size is not None else "") + ("-sym" if s.symmetric else "")


@dataclass
class BudgetPlan:
    """What the solver works with: the layers it chooses for, their candidate sizes, and the bits left for them."""

    free: list[str]  # layers whose scheme the budget chooses (no override fixes them)
    shapes: dict[str, tuple[int, int]]  # every targeted layer: (out_features, in_features)
    sizes: dict[str, list[int]]  # free layer -> bits of each candidate
    fixed_bits: int  # what the budget's scope holds besides the free layers (and the embedding, when it chooses it)
    budget_bits: int  # the whole budget in bits
    unit: str  # "bits per weight" or "MB"
    embedding: EmbeddingCandidates | None = None  # the token embedding, when the budget chooses its scheme too
    embedding_sizes: list[int | None] = field(default_factory=list)  # bits of each embedding candidate

    @property
    def available(self) -> int:
        return self.budget_bits - self.fixed_bits

    def describe(self, bits: int) -> str:
        if self.unit == "MB":
            return f"{bits / 8e6:.2f} MB"
        weights = sum(o * i for o, i in self.shapes.values())
        return f"{bits / weights:.3f} bits per weight"


def plan_budget(recipe: Recipe, model: nn.Module, layers: dict[str, nn.Module], schemes: dict[str, Scheme],
                scale_dtype: torch.dtype) -> BudgetPlan:
    """The bits the budget leaves for the layers it chooses. `model`: the model (a meta skeleton is enough), `layers`:
    every targeted Linear, `schemes`: the scheme of each quantized one (overrides applied). A budget that even the
    smallest candidates cannot meet is an error here, before any heavy work."""
    b = recipe.scheme.budget
    cands = candidates(recipe)
    emb_cands, emb_sizes = None, []
    has_g_idx = stores_g_idx(recipe, [*schemes.values(), *cands])  # whether any choice could store g_idx
    fixed = {n for n in layers if any(matches(n, o.targets) for o in recipe.overrides)}
    free = [n for n in schemes if n not in fixed]
    prefix = decoder_blocks(model)[0] + "."
    outside = [n for n in free if not n.startswith(prefix)]
    if outside:
        raise BadInputError(f"scheme.budget: {outside[0]} lies outside the decoder blocks, where no calibration "
                            "activations reach to measure it; fix its scheme with an override (or ignore it)")
    shapes = {n: (m.out_features, m.in_features) for n, m in layers.items()}
    for n in free:
        if not any(c.fits(shapes[n][1]) for c in cands):
            raise BadInputError(f"scheme.budget.candidates: none fits {n} (in_features {shapes[n][1]}); add one whose "
                                "group size divides it, or a per-channel one")
    # a candidate whose group size does not divide a layer is simply not offered to that layer
    sizes = {n: [stored_bits(*shapes[n], c, scale_dtype, has_g_idx) if c.fits(shapes[n][1]) else None for c in cands]
             for n in free}
    fixed_bits = sum(stored_bits(*shapes[n], schemes[n], scale_dtype, has_g_idx) for n in fixed if n in schemes)
    if b.bits_per_weight is not None:
        budget_bits = math.floor(b.bits_per_weight * sum(o * i for o, i in shapes.values()))
        dtype_bits = torch.finfo(scale_dtype).bits
        fixed_bits += sum(o * i * dtype_bits for n, (o, i) in shapes.items() if n not in schemes)  # skipped layers
        unit = "bits per weight"
    else:
        budget_bits = math.floor(b.size_mb * 8e6)
        emb = embedding_plan(recipe, model)
        if b.embedding is not None:  # the budget chooses it: its table counts as one more choice below
            name, tied = input_embedding(model)
            emb_cands = EmbeddingCandidates(name, tied, tuple(None if c is None else c.to_scheme() for c in b.embedding))
        quantized = set(schemes) | ({emb.name} if emb else set()) | ({emb_cands.name} if emb_cands else set())
        fixed_bits += _other_tensor_bits(model, quantized, scale_dtype)  # skipped layers' weights included
        if emb is not None:
            table = model.get_submodule(emb.name)
            fixed_bits += stored_bits(table.num_embeddings, table.embedding_dim, emb.scheme, scale_dtype, False)
        if emb_cands is not None:
            table = model.get_submodule(emb_cands.name)
            shape = (table.num_embeddings, table.embedding_dim)
            emb_sizes = [shape[0] * shape[1] * torch.finfo(scale_dtype).bits if c is None
                         else stored_bits(*shape, c, scale_dtype, False) if c.fits(shape[1]) else None
                         for c in emb_cands.schemes]
            if all(size is None for size in emb_sizes):
                raise BadInputError(f"scheme.budget.embedding: no candidate's group size divides the embedding width "
                                    f"{shape[1]} of {emb_cands.name}")
        fixed_bits += _header_bits(model, set(schemes), has_g_idx,
                                   emb.name if emb else emb_cands.name if emb_cands else None)
        unit = "MB"
    plan = BudgetPlan(free, shapes, sizes, fixed_bits, budget_bits, unit, emb_cands, emb_sizes)
    least = fixed_bits + sum(_smallest(s) for s in [*sizes.values(), *([emb_sizes] if emb_cands else [])])
    if least > budget_bits:
        what = f"bits_per_weight: {b.bits_per_weight}" if unit != "MB" else f"size_mb: {b.size_mb}"
        raise BadInputError(f"scheme.budget.{what} is below the smallest model the candidates allow "
                            f"({plan.describe(least)}); raise the budget or add smaller candidates")
    return plan


def _header_bits(model: nn.Module, quantized: set[str], has_g_idx: bool, embedding: str | None = None) -> int:
    """An upper bound on the safetensors headers of an llmq checkpoint of `model`: per tensor its JSON entry (name,
    dtype, shape, offsets: under len(name) + 96 bytes), per shard (one per decoder block and one for the rest) the
    length prefix and metadata, so a size_mb budget holds for the files on disk. `embedding`: the token embedding,
    when it is stored quantized (no g_idx)."""
    names = []
    for name in dict.fromkeys(model.state_dict(keep_vars=True)):
        layer, _, leaf = name.rpartition(".")
        if layer == embedding and leaf == "weight":
            names += [f"{layer}.{k}" for k in ("qweight", "scales", "qzeros")]
        elif layer in quantized and leaf == "weight":
            names += [f"{layer}.{k}" for k in ("qweight", "scales", "qzeros", *(("g_idx",) if has_g_idx else ()))]
        else:
            names.append(name)
    shards = len(decoder_blocks(model)[1]) + 1
    return 8 * (sum(len(n) + 96 for n in names) + 128 * shards)


def _other_tensor_bits(model: nn.Module, quantized: set[str], dtype: torch.dtype) -> int:
    """Bits of every tensor an llmq checkpoint stores besides the quantized weights: floating parameters in `dtype`
    (tied ones once), persistent buffers as they are."""
    state = model.state_dict(keep_vars=True)
    # a tied head's weight is the quantized embedding's tensor: skipped by identity, whichever name comes first
    seen = {id(t) for name, t in state.items() if name.rpartition(".")[0] in quantized and name.endswith(".weight")}
    bits = 0
    dtype_bits = torch.finfo(dtype).bits
    for t in state.values():
        if id(t) in seen:
            continue
        seen.add(id(t))
        bits += t.numel() * (dtype_bits if t.is_floating_point() else t.element_size() * 8)
    return bits


def units(free: list[str], prefix: str, clusters: list[list[str]], tie: bool) -> list[list[str]]:
    """What the solver chooses for: single layers, or (tie) the free layers of each decoder block (`prefix`.i) that
    read one input together (`clusters`: block-relative names, the same in every block)."""
    if not tie:
        return [[n] for n in free]
    cluster_of = {rel: tuple(c) for c in clusters for rel in c}
    groups: dict[tuple, list[str]] = {}
    for n in free:
        block, rel = n.removeprefix(prefix + ".").split(".", 1) if n.startswith(prefix + ".") else (n, "")
        groups.setdefault((block, cluster_of.get(rel, (rel,))), []).append(n)
    return list(groups.values())


def _summed(values: list[int | float | None]):
    return None if any(v is None for v in values) else sum(values)


def assign(recipe: Recipe, plan: BudgetPlan, scores: dict[str, list[float | None]], prefix: str = "",
           clusters: list[list[str]] = ()) -> tuple[Recipe, dict[str, Scheme]]:
    """Solve, and return (the recipe with one override per chosen layer and no budget, {layer: chosen scheme})."""
    cands = candidates(recipe)
    groups = units(plan.free, prefix, list(clusters), recipe.scheme.budget.tie_shared_inputs)
    sizes = [[_summed([plan.sizes[n][c] for n in g]) for c in range(len(cands))] for g in groups]
    group_scores = [[_summed([scores[n][c] for n in g]) for c in range(len(cands))] for g in groups]
    if plan.embedding is not None:  # one more choice, with its own candidates
        sizes.append(plan.embedding_sizes)
        group_scores.append(scores[plan.embedding.name])
    picks = solve(sizes, group_scores, plan.available)
    chosen = {n: cands[c] for g, c in zip(groups, picks) for n in g}
    chosen = {n: chosen[n] for n in plan.free}
    chosen_overrides = [
        LayerOverride(targets=[re.escape(n)], bits=s.bits, group_size=s.group_size, symmetric=s.symmetric)
        for n, s in chosen.items()
    ]
    update: dict = {"budget": None}
    if plan.embedding is not None:
        table = plan.embedding.schemes[picks[-1]]
        update["embedding"] = None if table is None else EmbeddingScheme(
            bits=table.bits, group_size=table.group_size, symmetric=table.symmetric)
    scheme = recipe.scheme.model_copy(update=update)
    resolved = recipe.model_copy(update={"scheme": scheme, "overrides": [*recipe.overrides, *chosen_overrides]})
    return resolved, chosen


def used_bits(plan: BudgetPlan, chosen: dict[str, Scheme], scale_dtype: torch.dtype, has_g_idx: bool,
              table: Scheme | None = None) -> int:
    """Bits the chosen assignment takes (`table`: the embedding's chosen scheme, when the budget chose it)."""
    bits = plan.fixed_bits + sum(stored_bits(*plan.shapes[n], s, scale_dtype, has_g_idx) for n, s in chosen.items())
    if plan.embedding is not None:
        bits += plan.embedding_sizes[plan.embedding.schemes.index(table)]
    return bits


def embedding_label(s: Scheme | None) -> str:
    return "none (full precision)" if s is None else label(s)


def choose(recipe: Recipe, base_dir: Path, calibration: torch.Tensor, scale_dtype: torch.dtype,
           device: torch.device) -> tuple[Recipe, dict]:
    """`llmq run`'s budget step: measure (or reuse) the sensitivity, solve, and return the resolved recipe and what
    report.json records (the budget, what it met, the measurement, each layer's scheme)."""
    model = skeleton(base_dir)
    layers = targeted_linears(model, recipe.targets, recipe.ignore)
    schemes = check_against_layers(recipe, {n: m.in_features for n, m in layers.items()})
    plan = plan_budget(recipe, model, layers, schemes, scale_dtype)
    cands = candidates(recipe)
    scores, facts = sensitivity.measure(recipe, base_dir, calibration, cands, plan.free, scale_dtype, device,
                                        plan.embedding)
    t = time.perf_counter()
    resolved, chosen = assign(recipe, plan, scores, decoder_blocks(model)[0], facts["clusters"])
    solve_s = time.perf_counter() - t
    table = resolved.scheme.embedding.to_scheme() if resolved.scheme.embedding is not None else None
    used = used_bits(plan, chosen, scale_dtype, stores_g_idx(recipe, [*schemes.values(), *chosen.values()]), table)
    b = recipe.scheme.budget
    record = {
        "budget": b.model_dump(mode="json", exclude={"candidates", "embedding"}), "candidates": [label(c) for c in cands],
        "unit": plan.unit, "budget_bits": plan.budget_bits, "used_bits": used,
        "used": plan.describe(used), "allowed": plan.describe(plan.budget_bits),
        "sensitivity": {**facts, "solve_seconds": round(solve_s, 3)},
        "predicted_error": sum(scores[n][cands.index(s)] for n, s in chosen.items()),
        "layers": {n: label(s) for n, s in chosen.items()},
        "counts": {label(c): sum(s == c for s in chosen.values()) for c in cands},
    }
    if plan.embedding is not None:
        emb_scores = scores[plan.embedding.name]
        record["embedding"] = {"name": plan.embedding.name, "tied_head": plan.embedding.tied_head,
                               "chosen": embedding_label(table),
                               "candidates": {embedding_label(c): {"bits": size, "score": score} for c, size, score
                                              in zip(plan.embedding.schemes, plan.embedding_sizes, emb_scores)}}
        record["predicted_error"] += emb_scores[plan.embedding.schemes.index(table)]
    return resolved, record
