"""What a YAML author reads when their file is wrong: one line naming the file, or the key path and what was
expected (pydantic's validation errors)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import BadInputError


def load_yaml(path: Path, what: str) -> Any:
    """A YAML file through the safe loader; anything that is not readable YAML is one BadInputError naming `path`."""
    return _load(path, what, "YAML", yaml.safe_load, yaml.YAMLError, lambda e: str(e).splitlines()[0])


def load_json(path: Path, what: str) -> Any:
    """A JSON file; anything that is not readable JSON is one BadInputError naming `path`."""
    return _load(path, what, "JSON", json.loads, json.JSONDecodeError, str)


def _load(path: Path, what: str, syntax: str, parse, syntax_error: type[Exception], detail) -> Any:
    try:
        return parse(path.read_text(encoding="utf-8"))
    except (syntax_error, UnicodeDecodeError) as e:
        raise BadInputError(f"{path}: not valid {syntax} ({detail(e)})") from None
    except RecursionError:
        raise BadInputError(f"{path}: nested too deeply to be a {what}") from None
    except OSError as e:
        raise BadInputError(f"{path}: cannot read it ({e.strerror or e})") from None


# Keys users bring from the tools they know (llm-compressor / compressed-tensors, GPTQModel / AutoGPTQ, AutoAWQ),
# and what llmq calls them: an unknown key that is one of these gets the llmq spelling in its message.
PEER_KEYS = {
    "num_bits": "bits", "wbits": "bits", "w_bit": "bits",
    "q_group_size": "group_size", "groupsize": "group_size",
    "sym": "symmetric", "zero_point": "symmetric (its opposite)",
    "dampening_frac": "damp", "damp_percent": "damp",
    "desc_act": "act_order", "actorder": "act_order",
    "strategy": "group_size (strategy: channel is group_size: null; strategy: group is group_size: N)",
    "quant_method": "method.name", "observer": "method.clip",
}


def first_error(e: ValidationError, root: type[BaseModel]) -> str:
    """The first problem of `e` as 'path: what is wrong (got value)'; `root` is the model that was validated."""
    err = e.errors()[0]
    path = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    path = path or "(top level)"
    if err["type"] == "extra_forbidden":
        key = str(err["loc"][-1])
        if key in PEER_KEYS:
            return f"{path}: unknown key; llmq calls it {PEER_KEYS[key]}"
        return f"{path}: unknown key (expected one of {', '.join(_keys_at(root, err['loc'][:-1]))})"
    if err["type"] == "missing":
        return f"{path}: required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    shown = repr(got) if isinstance(got, (str, int, float, bool, type(None))) else type(got).__name__
    more = f" ({len(e.errors()) - 1} more problem(s))" if len(e.errors()) > 1 else ""
    return f"{path}: {msg} (got {shown}){more}"


def _keys_at(root: type[BaseModel], loc: tuple) -> list[str]:
    """The keys `root` accepts at a nested location, for 'unknown key' messages."""
    model = root
    for part in loc:
        annotation = model.model_fields[part].annotation if part in model.model_fields else None
        nested = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not nested:
            break
        model = nested[0]
    return list(model.model_fields)
