"""Which Linear layers a recipe quantizes, and the checks that need the model's layer shapes (run on a meta-device
skeleton, before any weight is read)."""

from __future__ import annotations

import re
from typing import Any

from ..errors import BadInputError


def is_targeted(module_name: str, targets: list[str], ignore: list[str]) -> bool:
    """A module is quantized when some target regex matches its full name and no ignore regex does."""
    return any(re.fullmatch(t, module_name) for t in targets) and not any(re.fullmatch(i, module_name) for i in ignore)


def check_against_layers(recipe: Any, layers: dict[str, int]) -> None:
    """Shape checks once the model is known (`recipe`: a Recipe): `layers` maps each targeted Linear's name to its in_features."""
    if not layers:
        raise BadInputError(f"targets {recipe.targets} / ignore {recipe.ignore} select no Linear layer of the model")
    gs = recipe.scheme.group_size
    if gs is None:
        return
    for name, in_features in layers.items():
        if in_features % gs:
            raise BadInputError(
                f"scheme.group_size: {gs} does not divide in_features {in_features} of {name} "
                f"(try a divisor of {in_features}, e.g. 64 or 32, or null for per-channel)"
            )
