"""Class-conditional generation: parallel decoding of tokens, then the tokenizer's decoder.

`MaskGITSampler` builds both models from a config once and jit-compiles one program per
(batch shape, decoding options); later calls with the same shapes reuse it.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from maskgit_jax import config_lib, validation
from maskgit_jax.decoding import core as decoding
from maskgit_jax.decoding import mask_schedule
from maskgit_jax.models import build_tokenizer, build_transformer

Array = jax.Array


def class_conditional_inputs(labels: Array, config: ml_collections.ConfigDict) -> Array:
    """Sequences [B, L]: the class token `codebook_size + label`, then all image tokens masked."""
    num_tokens = config_lib.sequence_length(config) - 1
    class_tokens = config.tokenizer.codebook_size + labels.astype(jnp.int32)
    masked = jnp.full((labels.shape[0], num_tokens), config_lib.mask_token_id(config), jnp.int32)
    return jnp.concatenate([class_tokens[:, None], masked], axis=1)


def cast_matmul_kernels(tree: Any, dtype: Any) -> Any:
    """Casts the `kernel` leaves of `tree` to `dtype` (no-op for float32), once per program.

    Only matmul operands are cast: biases, LayerNorm parameters and embedding tables stay
    float32, which keeps bf16 decoding closer to fp32 (97.9% vs 97.3% equal argmax tokens
    with everything cast, imagenet256 with random weights) at no cost in speed.
    """
    if jnp.dtype(dtype) == jnp.float32:
        return tree

    def cast(path, x):
        is_kernel = getattr(path[-1], "key", None) == "kernel"
        return x.astype(dtype) if is_kernel and jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree_util.tree_map_with_path(cast, tree)


class MaskGITSampler:
    """Samples images for class labels from tokenizer and transformer variables.

    `dtype` is the transformer's compute dtype (float32, or bfloat16 with fp32 accumulation).
    """

    def __init__(self, config: ml_collections.ConfigDict, dtype: Any = jnp.float32):
        self.config = config
        self.tokenizer = build_tokenizer(config)
        self.transformer = build_transformer(config, dtype=dtype)
        self.grid_side = config_lib.tokens_per_side(config)

    def codebook_logits(self, transformer_variables: Any, ids: Array) -> Array:
        """Logits over the codebook only: the class and mask tokens are never sampled."""
        return self.transformer.apply(
            transformer_variables, ids, num_logits=self.config.tokenizer.codebook_size
        )

    @functools.partial(
        jax.jit, static_argnames=("self", "num_steps", "schedule", "return_all_steps")
    )
    def _generate_tokens(
        self,
        transformer_variables,
        labels,
        rng,
        choice_temperature,
        temperature,
        *,
        num_steps,
        schedule,
        return_all_steps=False,
    ):
        # Cast the weights to the compute dtype once, not in every decoding step.
        transformer_variables = cast_matmul_kernels(transformer_variables, self.transformer.dtype)
        return decoding.decode(
            class_conditional_inputs(labels, self.config),
            rng,
            self.codebook_logits,
            transformer_variables,
            mask_token_id=config_lib.mask_token_id(self.config),
            num_steps=num_steps,
            choice_temperature=choice_temperature,
            schedule=schedule,
            temperature=temperature,
            return_all_steps=return_all_steps,
        )

    @functools.partial(jax.jit, static_argnames=("self",))
    def _decode_images(self, tokenizer_variables, image_tokens):
        grid = image_tokens.reshape(-1, self.grid_side, self.grid_side)
        images = self.tokenizer.apply(tokenizer_variables, grid, method="decode")
        return jnp.clip(images, 0.0, 1.0)

    def _options(self, num_steps, choice_temperature, schedule, temperature):
        sampling = self.config.sampling
        num_steps = sampling.num_steps if num_steps is None else num_steps
        validation.check_num_steps(num_steps)
        return (
            num_steps,
            sampling.choice_temperature if choice_temperature is None else choice_temperature,
            sampling.schedule if schedule is None else schedule,
            sampling.temperature if temperature is None else temperature,
        )

    def generate_tokens(
        self,
        transformer_variables: Any,
        labels,
        rng: jax.Array,
        *,
        num_steps: int | None = None,
        choice_temperature: float | None = None,
        schedule: str | None = None,
        temperature: float | None = None,
    ) -> Array:
        """Image tokens [B, L-1] for `labels` [B]; options default to `config.sampling`.

        `labels` may be a device array sharded over a mesh's batch axis (with the variables
        replicated or sharded on the same mesh): the one compiled program then splits the
        batch over the devices, and the tokens come back sharded the same way.
        """
        if not isinstance(labels, jax.Array) or labels.is_fully_addressable:
            validation.check_labels(np.asarray(labels), self.config.num_classes)
        if not isinstance(labels, jax.Array):
            labels = jnp.asarray(labels, jnp.int32)
        num_steps, choice_temperature, schedule, temperature = self._options(
            num_steps, choice_temperature, schedule, temperature
        )
        mask_schedule.validate(schedule)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0; got {temperature}.")
        tokens = self._generate_tokens(
            transformer_variables,
            labels.astype(jnp.int32),
            rng,
            jnp.float32(choice_temperature),
            jnp.float32(temperature),
            num_steps=int(num_steps),
            schedule=schedule,
        )
        return tokens[:, 1:]

    def sample(
        self, tokenizer_variables: Any, transformer_variables: Any, labels, rng: jax.Array, **kw
    ) -> Array:
        """Images [B, H, W, 3] in [0, 1] as a device array laid out like `labels`.

        The device-side form of `generate` for sharded evaluation (`maskgit_jax.evaluate`,
        FID during training): no host transfer; keyword options as `generate_tokens`.
        """
        tokens = self.generate_tokens(transformer_variables, labels, rng, **kw)
        return self._decode_images(tokenizer_variables, tokens)

    def generate(
        self, tokenizer_variables: Any, transformer_variables: Any, labels, rng: jax.Array, **kw
    ) -> np.ndarray:
        """Images [B, H, W, 3] in [0, 1] for `labels`; keyword options as `generate_tokens`."""
        return np.asarray(
            self.sample(tokenizer_variables, transformer_variables, labels, rng, **kw)
        )

    def decode_tokens(self, tokenizer_variables: Any, tokens) -> np.ndarray:
        """Images [B, H, W, 3] in [0, 1] for image tokens [B, h*w] or [B, h, w]."""
        tokens = validation.check_token_ids(tokens, self.config.tokenizer.codebook_size)
        if tokens.ndim == 3:
            tokens = tokens.reshape(len(tokens), -1)
        if tokens.ndim != 2 or tokens.shape[1] != self.grid_side**2:
            raise ValueError(
                f"tokens must be [B, {self.grid_side**2}] or [B, {self.grid_side}, "
                f"{self.grid_side}] for this model; got shape {tokens.shape}."
            )
        return np.asarray(self._decode_images(tokenizer_variables, jnp.asarray(tokens)))
