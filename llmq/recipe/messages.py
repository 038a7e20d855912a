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


def first_error(e: ValidationError, root: type[BaseModel]) -> str:
    """The first problem of `e` as 'path: what is wrong (got value)'; `root` is the model that was validated."""
    err = e.errors()[0]
    path = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    path = path or "(top level)"
    if err["type"] == "extra_forbidden":
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
