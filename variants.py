"""The registry of text-anchor variants: one entry each, one name everywhere (args.json, results, sweep).

To add a variant, subclass `forward_utils.Variant` in a file of its own and add an instance here (see the
README's "Adding a variant").
"""
from __future__ import annotations

import json
from pathlib import Path

from forward_utils import Variant
from forward_utils_cross_attention import CrossAttentionVariant
from utils.errors import UserError

VARIANTS: dict[str, Variant] = {}


def register(variant: Variant) -> Variant:
    """Adds `variant` under its name (a second registration of a name replaces the first)."""
    VARIANTS[variant.name] = variant
    return variant


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise UserError(f"unknown variant {name!r}; registered: {', '.join(VARIANTS)}")
    return VARIANTS[name]


def read_saved_args(save_dir: Path) -> dict:
    """The flags a run was trained with (`<save_dir>/args.json`); {} for a run without one (e.g. a
    checkpoint written by the original code)."""
    path = save_dir / "args.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e}); restore it from the training run, or delete it (evaluation "
                        "then takes the command line's flags, a training starts its settings anew)") from None


def variant_of_run(save_dir: Path, saved: dict) -> Variant:
    """The variant that trained `save_dir`: as args.json says, else the variant whose own text checkpoint
    is there, else the baseline."""
    if "variant" in saved:
        return get_variant(saved["variant"])
    for variant in VARIANTS.values():
        if variant.text_ckpt != Variant.text_ckpt and (save_dir / variant.text_ckpt).exists():
            return variant
    return VARIANTS[Variant.name]


register(Variant())
register(CrossAttentionVariant())
