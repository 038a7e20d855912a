"""What kind of checkpoint a folder holds, read from its config.json alone (no weights are touched).

Every command that takes someone else's checkpoint starts here, so that a foreign or unsupported checkpoint gets
one message saying what it is and what llmq can do with it, instead of a stack trace or — worse — random weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..describe import scheme_words
from ..errors import BadInputError
from ..numerics import PEER_BITS
from ..recipe import load_json

_BITS = "/".join(map(str, PEER_BITS))
# What llmq reads, as the message to users says it.
IMPORTABLE = (f"GPTQ checkpoints (v1 and v2 zero points, {_BITS}-bit) and compressed-tensors pack-quantized int "
              f"checkpoints ({_BITS}-bit)")


@dataclass(frozen=True)
class Detected:
    kind: str  # "llmq" | "gptq" | "compressed-tensors" | "full-precision" | another quant_method, verbatim
    label: str  # for people: "GPTQ v1, 4-bit, group 128, asymmetric"
    importable: bool = False
    problem: str | None = None  # why llmq cannot import it, when it cannot
    quantization_config: dict[str, Any] = field(default_factory=dict)


def read_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise BadInputError(f"{folder}: no config.json (not a Hugging Face model folder)")
    config = load_json(path, "model config")
    if not isinstance(config, dict):
        raise BadInputError(f"{path}: expected a JSON object (a model config), got {type(config).__name__}")
    return config


def detect(folder: str | Path) -> Detected:
    qc = read_config(folder).get("quantization_config")
    if not qc:
        return Detected("full-precision", "a full-precision checkpoint (no quantization_config)")
    if not isinstance(qc, dict):
        return Detected("unknown", "a checkpoint with an unreadable quantization_config", problem="quantization_config is not a mapping")
    method = str(qc.get("quant_method", "")).lower()
    if method == "llmq":
        return Detected("llmq", f"an llmq checkpoint ({scheme_words(qc.get('bits'), qc.get('group_size'), qc.get('sym'))})",
                        quantization_config=qc)
    if method == "gptq":
        return _gptq(qc)
    if method == "compressed-tensors":
        return _compressed_tensors(qc)
    if method == "bitsandbytes":
        kind = f"4-bit {qc.get('bnb_4bit_quant_type', 'nf4')}" if qc.get("load_in_4bit") else "8-bit (LLM.int8)"
        return Detected(method, f"a bitsandbytes {kind} checkpoint", problem="bitsandbytes checkpoints load with transformers + bitsandbytes; llmq cannot turn them into integer-grid layers", quantization_config=qc)
    return Detected(method or "unknown", f"a {method or 'unknown'}-quantized checkpoint", problem=f"quant_method {method!r} is not a format llmq reads", quantization_config=qc)


def _gptq(qc: dict[str, Any]) -> Detected:
    fmt = str(qc.get("checkpoint_format", qc.get("format", "gptq"))).lower()
    version = {"gptq": "v1", "gptq_v2": "v2"}.get(fmt)
    label = f"a GPTQ {version or fmt} checkpoint ({scheme_words(qc.get('bits'), qc.get('group_size'), qc.get('sym', True))})"
    if version is None:
        return Detected("gptq", label, problem=f"GPTQ checkpoint_format {fmt!r} (llmq reads 'gptq' and 'gptq_v2')", quantization_config=qc)
    if qc.get("bits") not in PEER_BITS:
        return Detected("gptq", label, problem=f"{qc.get('bits')}-bit GPTQ (llmq reads {_bits_words()} bits)",
                        quantization_config=qc)
    return Detected("gptq", label, importable=True, quantization_config=qc)


def ct_weight_args(qc: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """The weight scheme of a compressed-tensors config's first group (every group checked) and None, or None and why
    llmq cannot read it."""
    groups = qc.get("config_groups") or {}
    fmt = qc.get("format")
    schemes = []
    if not isinstance(groups, dict) or not all(isinstance(g, dict) for g in groups.values()):
        return None, "config_groups is not a mapping of named groups"
    for name, group in groups.items():
        if group.get("input_activations") or group.get("output_activations"):
            return None, f"config group {name!r} quantizes activations too (llmq reads weight-only schemes)"
        if group.get("format", fmt) != "pack-quantized":
            return None, f"config group {name!r} uses format {group.get('format', fmt)!r} (llmq reads 'pack-quantized')"
        schemes.append(group.get("weights") or {})
    if not schemes:
        return None, "no config_groups with weight quantization"
    for w in schemes:  # several groups (per-layer schemes) are read layer by layer: compressed_tensors.layer_schemes
        if not isinstance(w, dict):
            return None, "the weights of a config group are not a mapping"
        if w.get("type", "int") != "int" or w.get("num_bits") not in PEER_BITS:
            return None, f"weights {w.get('type', 'int')} {w.get('num_bits')}-bit (llmq reads int {_bits_words()} bits)"
        if w.get("strategy") not in ("group", "channel"):
            return None, f"weight strategy {w.get('strategy')!r} (llmq reads 'group' and 'channel')"
        if w.get("actorder") in ("group", "dynamic"):
            return None, "actorder 'group' (a per-column group index; llmq reads static group order)"
        if w.get("dynamic"):
            return None, "dynamic weight quantization"
    return schemes[0], None


def _compressed_tensors(qc: dict[str, Any]) -> Detected:
    w, problem = ct_weight_args(qc)
    if w is None:
        return Detected("compressed-tensors", f"a compressed-tensors {qc.get('format')} checkpoint", problem=problem, quantization_config=qc)
    label = f"a compressed-tensors pack-quantized checkpoint ({scheme_words(w['num_bits'], w.get('group_size'), w.get('symmetric', True))})"
    if qc.get("quantization_status") not in (None, "compressed"):
        return Detected("compressed-tensors", label, problem=f"quantization_status {qc.get('quantization_status')!r} (llmq reads compressed checkpoints)", quantization_config=qc)
    return Detected("compressed-tensors", label, importable=True, quantization_config=qc)


def _bits_words() -> str:
    """'2, 3, 4 and 8'."""
    return ", ".join(map(str, PEER_BITS[:-1])) + f" and {PEER_BITS[-1]}"


def unsupported_message(folder: str | Path, found: Detected, action: str) -> str:
    why = f" ({found.problem})" if found.problem else ""
    return f"{folder} is {found.label}{why}; llmq {action} {IMPORTABLE}, and llmq checkpoints"
