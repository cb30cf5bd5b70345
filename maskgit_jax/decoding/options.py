"""One frozen, validated set of decoding options, shared by every path that samples.

Made once where options enter (a notebook call, a command's flags, a config), checked there,
then handed unchanged to the traced decoder: nothing downstream re-validates or re-defaults.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import jax.numpy as jnp
import ml_collections

from maskgit_jax.decoding import mask_schedule

# How the positions kept masked after each step are chosen: "confidence" (the paper: the
# least confident samples, with annealed Gumbel noise) or a fixed order ("halton": positions
# revealed in the 2-D Halton order, deterministically).
ORDERINGS = ("confidence", "halton")
# Compute dtypes of the transformer's matmuls (bf16 operands accumulate in fp32).
DTYPES = ("float32", "bfloat16")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    return real and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """What one MaskGIT decode does; hashable, so one compiled program serves each value.

    Attributes:
        num_steps: decoding steps T; the schedule runs over ratios (t + 1) / T.
        start_step: first step run (editing starts part-way, e.g. 2 of 12); in [0, T).
        schedule: mask schedule (`mask_schedule.SCHEDULES` or "pow<k>").
        choice_temperature: initial Gumbel scale of the confidence re-masking, annealed to 0
            (>= 0; unused by fixed orderings).
        temperature: softmax temperature of token sampling (> 0; 1 is the authors' sampler).
        ordering: one of `ORDERINGS`.
        guidance_scale: classifier-free guidance s >= 0: logits (1 + s) cond - s uncond.
        top_k: sample among the k most likely codes (None: all).
        dtype: transformer compute dtype, one of `DTYPES`.
    """

    num_steps: int = 12
    start_step: int = 0
    schedule: str = "cosine"
    choice_temperature: float = 4.5
    temperature: float = 1.0
    ordering: str = "confidence"
    guidance_scale: float = 0.0
    top_k: int | None = None
    dtype: str = "float32"

    def __post_init__(self):
        if not _is_int(self.num_steps) or self.num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1; got {self.num_steps!r}.")
        if not _is_int(self.start_step) or not 0 <= self.start_step < self.num_steps:
            raise ValueError(
                f"start_step must be an integer in [0, num_steps={self.num_steps}); "
                f"got {self.start_step!r}."
            )
        mask_schedule.validate(self.schedule)
        if not _is_real(self.choice_temperature) or self.choice_temperature < 0:
            raise ValueError(
                f"choice_temperature must be a finite number >= 0; got {self.choice_temperature!r}."
            )
        if not _is_real(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0; got {self.temperature!r}.")
        if self.ordering not in ORDERINGS:
            raise ValueError(f"ordering must be one of {ORDERINGS}; got {self.ordering!r}.")
        if not _is_real(self.guidance_scale) or self.guidance_scale < 0:
            raise ValueError(
                f"guidance_scale must be a finite number >= 0; got {self.guidance_scale!r}."
            )
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k must be an integer >= 1 or None; got {self.top_k!r}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}; got {self.dtype!r}.")
        # Canonical types, so that equal options hash equal (4 and 4.0 are one program).
        for name, kind in (
            ("num_steps", int),
            ("start_step", int),
            ("choice_temperature", float),
            ("temperature", float),
            ("guidance_scale", float),
        ):
            object.__setattr__(self, name, kind(getattr(self, name)))
        if self.top_k is not None:
            object.__setattr__(self, "top_k", int(self.top_k))

    @property
    def compute_dtype(self) -> jnp.dtype:
        """The jnp dtype of the transformer's matmuls."""
        return jnp.dtype(self.dtype)

    @property
    def guided(self) -> bool:
        """Whether classifier-free guidance runs (it doubles the transformer's batch)."""
        return self.guidance_scale > 0

    def replace(self, **changes: Any) -> DecodeOptions:
        """A copy with `changes` (validated again); `None` values leave a field as it is."""
        return dataclasses.replace(self, **_given(changes))

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, **overrides: Any) -> DecodeOptions:
        """`config.sampling`'s values with `overrides` on top (None overrides are ignored).

        Unknown option names are a TypeError naming the valid ones.
        """
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = set(overrides) - names
        if unknown:
            raise TypeError(f"unknown decoding options {sorted(unknown)}; valid: {sorted(names)}.")
        sampling = config.get("sampling", ml_collections.ConfigDict())
        values = {name: sampling[name] for name in names if name in sampling}
        return cls(**{**values, **_given(overrides)})


def _given(values: dict[str, Any]) -> dict[str, Any]:
    """`values` without the None entries (a flag or keyword the caller left unset).

    top_k=None is indistinguishable from unset, which is right: None is also its default.
    """
    return {key: value for key, value in values.items() if value is not None}
