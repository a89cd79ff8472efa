"""Small helpers shared by the typed configs: validating ``Literal`` choices and ranges."""

from __future__ import annotations

from typing import Any, get_args


def check_choice(option: str, value: Any, choices_type: Any) -> None:
    """Raise a ValueError naming ``option`` unless ``value`` is one of the ``Literal`` type's choices."""
    choices = get_args(choices_type)
    if value not in choices:
        raise ValueError(f"{option}={value!r} is not one of {', '.join(repr(c) for c in choices)}")


def check_positive(option: str, value: float, *, allow_zero: bool = False) -> None:
    """Raise a ValueError naming ``option`` unless ``value`` > 0 (or >= 0 with ``allow_zero``)."""
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{option}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def check_fraction(option: str, value: float) -> None:
    """Raise a ValueError naming ``option`` unless 0 <= ``value`` <= 1."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{option}={value!r} must lie in [0, 1]")
