"""What the decode loop samples from: codebook logits, guided and filtered, in a compute dtype."""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from maskgit_jax.models.attention import largest_divisor_at_most

# Activation bytes per transformer call on CPU: the float32 MLP activations [rows, 257, 3072]
# of 8 imagenet256 examples (25 MB). One call over a batch of 64 ran the bf16 forward at
# 171-180 ms per image against 124 at batch 8 (XLA:CPU fuses the large MLP differently).
CPU_CALL_ACTIVATION_BYTES = 8 * 257 * 3072 * 4


def rows_per_transformer_call(length: int, mlp_dim: int, backend: str) -> int | None:
    """Examples per device per transformer call while decoding (None: the whole batch).

    On CPU, calls whose MLP activations fit `CPU_CALL_ACTIVATION_BYTES`; accelerators take
    the whole batch in one call.
    """
    if backend != "cpu":
        return None
    return max(1, CPU_CALL_ACTIVATION_BYTES // (length * mlp_dim * 4))


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


@dataclasses.dataclass(eq=False, frozen=True)
class CodebookLogits:
    """`tokens_to_logits(params, ids)` for `decode`: codebook logits, guided and filtered.

    `params` is `(transformer_variables, guidance_scale)`: the weights (already cast with
    `cast_matmul_kernels`) and the traced guidance scale, so a new scale reuses the program.
    Hashed by identity: keep one instance per (transformer, top_k, guided) so that the
    decoder's compile cache is reused.

    Attributes:
        transformer: the masked transformer module (its `dtype` is the compute dtype).
        codebook_size: logits are sliced to the codebook: class and mask ids are never sampled.
        mask_token_id: the id that replaces the class token in the unconditional input.
        top_k: keep the k largest logits per position (None: all).
        guided: classifier-free guidance, (1 + s) cond - s uncond, on a doubled batch.
        rows_per_device: examples of each device's share of the batch per transformer call
            (None: all at once). The calls run one after another in a `lax.map`, each over
            every device's rows, so a sharded batch stays spread over its devices.
        num_devices: devices the batch is sharded over, in contiguous blocks of rows.
    """

    transformer: Any
    codebook_size: int
    mask_token_id: int
    top_k: int | None = None
    guided: bool = False
    rows_per_device: int | None = None
    num_devices: int = 1

    def __call__(self, params: Any, ids: jax.Array) -> jax.Array:
        """Codebook logits [B, L, codebook_size] of token ids [B, L]."""
        variables, guidance_scale = params
        if self.guided:
            # Unconditional input: the class token (position 0) replaced by the mask token.
            unconditional = ids.at[:, 0].set(self.mask_token_id)
            both = self._transformer_logits(variables, jnp.stack([ids, unconditional], 1))
            cond, uncond = both[:, 0], both[:, 1]
            logits = (1.0 + guidance_scale) * cond - guidance_scale * uncond
        else:
            logits = self._transformer_logits(variables, ids[:, None])[:, 0]
        if self.top_k is not None and self.top_k < self.codebook_size:
            kth = jax.lax.top_k(logits, self.top_k)[0][..., -1:]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        return logits

    def _transformer_logits(self, variables: Any, ids: jax.Array) -> jax.Array:
        """Codebook logits [B, S, L, V] of ids [B, S, L] (S sequences per row), in chunks.

        Row b's S sequences stay in one chunk and on row b's device. Each device's B / D rows
        are cut into chunks of at most `rows_per_device` examples' sequences; chunk i gathers
        the i-th chunk of every device, so each call keeps the batch's sharding.
        """
        batch, per_row, length = ids.shape
        per_device = batch // self.num_devices
        rows = per_device
        if self.rows_per_device is not None and batch % self.num_devices == 0:
            budget = max(1, self.rows_per_device // per_row)
            rows = largest_divisor_at_most(per_device, budget)
        if rows == per_device or batch % self.num_devices:
            flat = ids.reshape(batch * per_row, length)
            logits = self.transformer.apply(variables, flat, num_logits=self.codebook_size)
            return logits.reshape(batch, per_row, length, -1)
        chunks = per_device // rows
        # [devices, chunks, rows, S, L] -> [chunks, devices * rows * S, L]
        blocked = ids.reshape(self.num_devices, chunks, rows * per_row, length).swapaxes(0, 1)
        blocked = blocked.reshape(chunks, self.num_devices * rows * per_row, length)

        def call(chunk):
            return self.transformer.apply(variables, chunk, num_logits=self.codebook_size)

        logits = jax.lax.map(call, blocked)
        logits = logits.reshape(chunks, self.num_devices, rows * per_row, length, -1)
        return logits.swapaxes(0, 1).reshape(batch, per_row, length, -1)
