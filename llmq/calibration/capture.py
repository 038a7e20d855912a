"""Calibration activations, captured at the first decoder block and fed through one block at a time.

- `capture_inputs`: runs the model's embedding part and stops at the first block, keeping what that block is
  called with (hidden states plus position embeddings, masks and other keyword arguments).
- `BlockInputs`: those activations; it advances them through a block in place, or feeds a block with hooks on
  its Linear layers and an early stop once the layers of interest have seen their inputs (no need to finish the
  block's forward for that). For block-wise QAT it also carries the full-precision model's activations entering
  the same block (`reference`), the stream its training targets come from.
- `linear_clusters`: a block's Linear layers in the order they are called, grouped by shared input (q/k/v,
  then o, then gate/up, then down for Llama) — the groups of GPTQ's true-sequential mode.

Deliberately absent: finding the blocks (model/structure.py), loading weights (quantization/blockwise.py reads
blocks lazily from disk) and any quantization math.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import BadInputError


class _Stop(Exception):
    """Raised from a hook to end a forward pass early."""


def first_output(output: Any) -> torch.Tensor:
    """The hidden states of a decoder block's output (blocks return a tensor or a tuple starting with one)."""
    return output[0] if isinstance(output, (tuple, list)) else output


@dataclass
class BlockInputs:
    """Calibration activations entering a block: per batch, the hidden states and the other call arguments."""

    hidden: list[torch.Tensor]  # [batch, seq, hidden] each
    extras: list[tuple[tuple, dict[str, Any]]]  # (positional args after the hidden states, keyword args)
    # the full-precision model's hidden states entering the same block, when a method trains against them
    # (block-wise QAT); None otherwise
    reference: list[torch.Tensor] | None = None

    def keep_reference(self, hidden: list[torch.Tensor] | None = None) -> None:
        """Start the full-precision stream: `hidden` (captured with the full-precision token table, when the table is
        quantized), or else a copy of the hidden states (equal before any block is quantized)."""
        self.reference = hidden if hidden is not None else [h.clone() for h in self.hidden]

    @torch.no_grad()
    def reference_outputs(self, block: nn.Module) -> list[torch.Tensor]:
        """The block's outputs on the full-precision stream (call it before the block is quantized): the next
        block's reference, and this block's training target."""
        return [first_output(block(h, *args, **kwargs)) for h, (args, kwargs) in zip(self.reference, self.extras)]

    @torch.no_grad()
    def advance(self, block: nn.Module) -> None:
        """Replace the hidden states by the block's outputs, batch by batch in place: the next block's inputs
        without a second full set of the quantized stream's activations."""
        for h, (args, kwargs) in zip(self.hidden, self.extras):
            h.copy_(first_output(block(h, *args, **kwargs)))

    @torch.no_grad()
    def outputs(self, block: nn.Module) -> list[torch.Tensor]:
        """The block's output on every batch, the inputs left as they are."""
        return [first_output(block(h, *args, **kwargs)) for h, (args, kwargs) in zip(self.hidden, self.extras)]

    @torch.no_grad()
    def feed(self, block: nn.Module, taps: dict[nn.Module, Callable[[torch.Tensor], None]], stop_after: nn.Module | None):
        """Run every batch through `block`, calling taps[layer](input) before each tapped layer runs; the pass ends
        as soon as `stop_after` has been given its input (the rest of the block is not needed)."""

        def hook_for(layer, tap):
            def hook(module, args):
                tap(args[0])
                if module is stop_after:
                    raise _Stop

            return layer.register_forward_pre_hook(hook)

        handles = [hook_for(layer, tap) for layer, tap in taps.items()]
        try:
            for h, (args, kwargs) in zip(self.hidden, self.extras):
                try:
                    block(h, *args, **kwargs)
                except _Stop:
                    pass
        finally:
            for handle in handles:
                handle.remove()

    def with_hidden(self, hidden: list[torch.Tensor], reference: list[torch.Tensor] | None = None) -> BlockInputs:
        return BlockInputs(hidden, self.extras, reference)

    def saved(self) -> list[torch.Tensor]:
        """What a resume needs (on the CPU): the hidden states, then the reference stream if there is one."""
        return [h.cpu() for h in self.hidden + (self.reference or [])]


@torch.no_grad()
def capture_inputs(model: nn.Module, first_block: nn.Module, batches: list[torch.Tensor], device) -> BlockInputs:
    """Run `model` on each batch of token ids until `first_block` is called; keep its arguments. Only the modules
    before the first block need real weights (the blocks may still be on the meta device)."""
    hidden, extras = [], []

    def grab(module, args, kwargs):
        kwargs = dict(kwargs)
        if args:
            hidden.append(args[0])
            extras.append((tuple(args[1:]), kwargs))
        else:  # some models pass the hidden states by keyword; later calls pass them first, positionally
            hidden.append(kwargs.pop("hidden_states"))
            extras.append(((), kwargs))
        raise _Stop

    handle = first_block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _Stop:
                pass
            else:
                raise BadInputError(f"{type(model).__name__}: the forward pass never reached the first decoder block")
    finally:
        handle.remove()
    return BlockInputs(hidden, extras)


@torch.no_grad()
def linear_clusters(block: nn.Module, inputs: BlockInputs) -> list[list[str]]:
    """The block's Linear layers (names relative to the block) in the order one batch calls them, consecutive
    layers that receive the same input tensor grouped together. Layers the forward never calls are left out."""
    calls: list[tuple[str, torch.Tensor]] = []  # the tensors themselves, kept alive, compared by identity
    linears = {m: n for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    one = BlockInputs(inputs.hidden[:1], inputs.extras[:1])
    one.feed(block, {m: (lambda x, n=n: calls.append((n, x))) for m, n in linears.items()}, stop_after=None)
    clusters: list[list[str]] = []
    last_input = None
    for name, x in calls:
        if any(name in c for c in clusters):
            continue  # a layer called twice (weight sharing) joins the cluster of its first call
        if clusters and x is last_input:
            clusters[-1].append(name)
        else:
            clusters.append([name])
        last_input = x
    return clusters
