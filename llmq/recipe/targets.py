"""Which Linear layers a recipe quantizes, with which scheme, and the checks that need the model's layer shapes (run
on a meta-device skeleton, before any weight is read).

Patterns are Python regexes matched against the full module name; llm-compressor's spelling `re:<regex>` is
accepted too, with its meaning (matched from the start of the name, not necessarily to its end), and so is its
class-name target `Linear` (every Linear layer). Per-layer overrides (`overrides:` in a recipe) are tried in order and the first one whose targets
match a layer decides it: another scheme, or `skip` (the layer keeps its full-precision weights).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from ..errors import BadInputError
from ..numerics import Scheme

logger = logging.getLogger(__name__)


def pattern(p: str) -> str:
    """The full-match regex of a target pattern. Plain patterns match the whole module name; llm-compressor's
    `re:<regex>` matches from the start of the name, as compressed-tensors matches it (re.match), and its class-name
    target `Linear` selects every Linear layer (only Linear layers are ever targeted)."""
    if p == "Linear":
        return ".*"
    return f"(?:{p[3:]}).*" if p.startswith("re:") else p


def matches(module_name: str, patterns: list[str]) -> bool:
    return any(re.fullmatch(pattern(p), module_name) for p in patterns)


def is_targeted(module_name: str, targets: list[str], ignore: list[str]) -> bool:
    """A module is quantized when some target regex matches its full name and no ignore regex does."""
    return matches(module_name, targets) and not matches(module_name, ignore)


def layer_schemes(recipe: Any, names: list[str]) -> dict[str, Scheme]:
    """The scheme of each targeted layer (`recipe`: a Recipe): the first override matching it, else the recipe's
    scheme. Layers a `skip` override matches are left out: they stay in full precision."""
    default = recipe.scheme.to_scheme()
    out = {}
    for name in names:
        rule = next((o for o in recipe.overrides if matches(name, o.targets)), None)
        if rule is None:
            out[name] = default
        elif not rule.skip:
            out[name] = rule.scheme_over(default)
    return out


def check_against_layers(recipe: Any, layers: dict[str, int]) -> dict[str, Scheme]:
    """Shape checks once the model is known (`recipe`: a Recipe): `layers` maps each targeted Linear's name to its
    in_features. Returns each quantized layer's scheme (`layer_schemes`)."""
    if not layers:
        raise BadInputError(f"targets {recipe.targets} / ignore {recipe.ignore} select no Linear layer of the model")
    for i, rule in enumerate(recipe.overrides):
        hit = [n for n in layers if matches(n, rule.targets)]
        if not hit:
            raise BadInputError(f"overrides[{i}].targets {rule.targets} match no targeted Linear layer of the model "
                                f"(targeted layers look like {next(iter(layers))!r})")
        earlier = [j for j, o in enumerate(recipe.overrides[:i]) if any(matches(n, o.targets) for n in hit)]
        if earlier:
            logger.warning(f"overrides[{i}] overlaps overrides[{earlier[0]}]: the earlier one decides the layers both "
                           "match (first match wins)")
    schemes = layer_schemes(recipe, list(layers))
    if not schemes:
        raise BadInputError("overrides skip every targeted layer: nothing is left to quantize")
    for name, scheme in schemes.items():
        gs, in_features = scheme.group_size, layers[name]
        rule = next((i for i, o in enumerate(recipe.overrides) if matches(name, o.targets)), None)
        if rule is None and recipe.scheme.budget is not None:
            continue  # the budget chooses this layer's scheme among candidates that fit it (quantization/budget.py)
        if gs is not None and in_features % gs:
            where = "scheme.group_size" if rule is None else f"overrides[{rule}].group_size"
            raise BadInputError(
                f"{where}: {gs} does not divide in_features {in_features} of {name} "
                f"(try a divisor of {in_features}, e.g. 64 or 32, or null for per-channel)"
            )
    return schemes
