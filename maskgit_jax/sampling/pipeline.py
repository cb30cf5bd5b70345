"""A notebook-friendly MaskGIT pipeline: class-conditional generation and image editing.

`MaskGITPipeline` holds a config with the tokenizer's and transformer's weights (replicated on
a 1-D mesh of the local devices) and offers:

* `generate(labels, rng)`: images for class labels by parallel decoding, with optional top-k
  filtering, classifier-free guidance and a Halton reveal order;
* `inpaint`, `outpaint` and `edit`: the authors' demo recipe. Encode the image, mask the token
  cells covering the region to change (one token of margin on each side), decode from part-way
  along the schedule (`start_step=2` of `num_steps=12`), then composite output and input with
  the token mask upsampled to pixels and blurred by a Gaussian of radius `image_size/16 - 1`.

Batches are padded to a multiple of the device count and sharded along a "batch" mesh axis;
one jitted program serves the whole batch. Each row decodes with its own key
`fold_in(fold_in(rng, window), row)`, so a row's result depends on its inputs, the key and its
index only: not on the batch size, the padding or the number of devices.

Images of any size that is a multiple of the tokenizer's downsampling factor work. The
transformer sees a fixed token grid (`config.image_size / factor` per side), so larger token
canvases are filled window by window (windows overlapping by half, in raster order, each one
seeing what the earlier windows revealed as known tokens) and smaller ones are padded with
unknown tokens that are decoded and then dropped.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from maskgit_jax import config_lib, sharding, validation
from maskgit_jax.checkpoints import official as official_checkpoint
from maskgit_jax.checkpoints import pretrained
from maskgit_jax.decoding import core as decoding
from maskgit_jax.decoding import mask_schedule
from maskgit_jax.models import build_tokenizer, build_transformer

ORDERINGS = ("confidence", "halton")

# Defaults of the authors' editing demo: start at step 2 of 12.
EDIT_NUM_STEPS = 12
EDIT_START_STEP = 2

_BATCH_AXIS = "batch"


class EditResult(NamedTuple):
    """What the editing methods return with `return_details=True`.

    Attributes:
        images: float32 [B, H, W, 3] in [0, 1], the composited output.
        tokens: int32 [B, h, w], the decoded token grid (before compositing).
        input_tokens: int32 [B, h, w], the encoded input (the canvas, for outpainting).
        token_mask: bool [B, h, w], True where tokens were regenerated.
    """

    images: np.ndarray
    tokens: np.ndarray
    input_tokens: np.ndarray
    token_mask: np.ndarray


# ----------------------------------------------------------------------------------------------
# Host-side helpers (numpy): masks, Halton order, blur and compositing.


def _radical_inverse(index: int, base: int) -> float:
    """The van der Corput radical inverse of `index` in `base`, in [0, 1)."""
    result, scale = 0.0, 1.0 / base
    while index:
        index, digit = divmod(index, base)
        result += digit * scale
        scale /= base
    return result


@functools.lru_cache(maxsize=32)
def halton_order(height: int, width: int) -> np.ndarray:
    """A permutation of the `height * width` raster indices of a token grid, in Halton order.

    Points of the 2-D Halton sequence (bases 2 and 3; Besnier et al., ICLR 2025) are mapped to
    the grid cells they fall in; each cell is listed at its first hit. Consecutive prefixes
    are spread evenly over the grid, so revealing tokens in this order avoids clusters of
    neighbours decoded in the same step. Cells the sequence has not reached after many points
    (only possible for very elongated grids) follow in raster order.
    """
    if height < 1 or width < 1:
        raise ValueError(f"grid must be at least 1x1; got {height}x{width}.")
    total = height * width
    seen = np.zeros(total, bool)
    order = []
    index = 0
    while len(order) < total and index < 64 * total + 64:
        col = int(_radical_inverse(index, 2) * width)
        row = int(_radical_inverse(index, 3) * height)
        cell = row * width + col
        if not seen[cell]:
            seen[cell] = True
            order.append(cell)
        index += 1
    order.extend(np.flatnonzero(~seen).tolist())
    result = np.asarray(order, np.int32)
    result.flags.writeable = False
    return result


def _dilate(mask: np.ndarray, margin: int) -> np.ndarray:
    """Grows a bool mask [B, h, w] by `margin` cells in every direction (a square dilation)."""
    if margin <= 0:
        return mask
    height, width = mask.shape[1:]
    padded = np.pad(mask, ((0, 0), (margin, margin), (margin, margin)))
    out = np.zeros_like(mask)
    for dy in range(2 * margin + 1):
        for dx in range(2 * margin + 1):
            out |= padded[:, dy : dy + height, dx : dx + width]
    return out


def token_mask_from_pixels(mask: np.ndarray, factor: int, margin: int = 1) -> np.ndarray:
    """Token cells [B, H/f, W/f] covering any True pixel of `mask` [B, H, W], grown by `margin`."""
    mask = np.asarray(mask, bool)
    batch, height, width = mask.shape
    cells = mask.reshape(batch, height // factor, factor, width // factor, factor)
    return _dilate(cells.any(axis=(2, 4)), margin)


def token_mask_from_box(
    box: Sequence[float], height: int, width: int, factor: int, margin: int = 1
) -> np.ndarray:
    """Token cells [H/f, W/f] covering the pixel box (x0, y0, x1, y1; x1, y1 exclusive)."""
    x0, y0, x1, y1 = box
    pixels = np.zeros((1, height, width), bool)
    pixels[0, max(0, int(y0)) : max(0, math.ceil(y1)), max(0, int(x0)) : max(0, math.ceil(x1))] = 1
    return token_mask_from_pixels(pixels, factor, margin)[0]


def gaussian_kernel(sigma: float) -> np.ndarray:
    """A normalized 1-D Gaussian of standard deviation `sigma`, truncated at 3 sigma."""
    half = max(0, math.ceil(3.0 * sigma))
    if sigma <= 0 or half == 0:
        return np.ones(1, np.float32)
    offsets = np.arange(-half, half + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    return (kernel / kernel.sum()).astype(np.float32)


def gaussian_blur(masks: np.ndarray, sigma: float) -> np.ndarray:
    """Blurs float maps [B, H, W] with a separable Gaussian (edges extended); sigma <= 0: copy.

    Values farther than 3 sigma from any nonzero cell stay exactly 0 (the kernel is truncated).
    """
    masks = np.asarray(masks, np.float32)
    kernel = gaussian_kernel(sigma)
    half = kernel.size // 2
    if half == 0:
        return masks.copy()
    for axis in (1, 2):
        pad = [(0, 0)] * 3
        pad[axis] = (half, half)
        padded = np.pad(masks, pad, mode="edge")
        length = masks.shape[axis]
        out = np.zeros_like(masks)
        for k, weight in enumerate(kernel):
            out += weight * np.take(padded, np.arange(k, k + length), axis=axis)
        masks = out
    return masks


def composite(
    generated: np.ndarray, original: np.ndarray, token_mask: np.ndarray, radius: float
) -> np.ndarray:
    """Blends `generated` into `original` [B, H, W, 3] where the blurred token mask is high.

    `token_mask` [B, h, w] is upsampled to pixels (nearest) and blurred by a Gaussian of
    standard deviation `radius` pixels; outside the blur's reach the output equals `original`.
    """
    height, width = original.shape[1:3]
    factor_y, factor_x = height // token_mask.shape[1], width // token_mask.shape[2]
    pixels = np.repeat(np.repeat(token_mask.astype(np.float32), factor_y, 1), factor_x, 2)
    alpha = np.clip(gaussian_blur(pixels, radius), 0.0, 1.0)[..., None]
    return (alpha * generated + (1.0 - alpha) * original).astype(np.float32)


def _window_starts(size: int, window: int) -> list[int]:
    """Start offsets of windows of `window` cells covering `size` cells, overlapping by half."""
    if size <= window:
        return [0]
    stride = max(1, window // 2)
    starts = list(range(0, size - window, stride))
    return starts + [size - window]


# ----------------------------------------------------------------------------------------------
# Traced pieces.


@dataclasses.dataclass(eq=False, frozen=True)
class _CodebookLogits:
    """`tokens_to_logits(params, ids)` for decoding, with guidance and top-k applied.

    `params` is `(transformer_variables, guidance_scale)`. Hashed by identity: the pipeline
    keeps one instance per (top_k, guided) so that the decoder's compile cache is reused.
    """

    transformer: Any
    codebook_size: int
    mask_token_id: int
    top_k: int | None
    guided: bool

    def __call__(self, params: Any, ids: jax.Array) -> jax.Array:
        """Codebook logits [B, L, codebook_size], guided and filtered."""
        variables, guidance_scale = params
        if self.guided:
            # Unconditional input: the class token (position 0) replaced by the mask token.
            unconditional = ids.at[:, 0].set(self.mask_token_id)
            both = self.transformer.apply(
                variables, jnp.concatenate([ids, unconditional]), num_logits=self.codebook_size
            )
            cond, uncond = jnp.split(both, 2)
            logits = (1.0 + guidance_scale) * cond - guidance_scale * uncond
        else:
            logits = self.transformer.apply(variables, ids, num_logits=self.codebook_size)
        if self.top_k is not None and self.top_k < self.codebook_size:
            kth = jax.lax.top_k(logits, self.top_k)[0][..., -1:]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        return logits


def _order_decode(
    inputs: jax.Array,
    rng: jax.Array,
    tokens_to_logits: _CodebookLogits,
    params: Any,
    order_score: jax.Array,
    temperature: jax.Array,
    *,
    mask_token_id: int,
    num_steps: int,
    start_step: int,
    schedule: str,
) -> jax.Array:
    """Parallel decoding that re-masks by a fixed order instead of by confidence.

    The steps and counts are `decoding.decode`'s (sample every unknown position, keep
    `floor(N * gamma((t+1)/T))` masked, clamped to [1, still unknown - 1], return the last
    step's samples), but the positions kept masked are the unknown ones with the lowest
    `order_score` [L] (the latest in the order), deterministically: no Gumbel noise.
    """
    unknown_at_start = jnp.sum(inputs == mask_token_id, axis=-1, keepdims=True)
    length = inputs.shape[-1]

    def body(step, carry):
        seqs, rng, _ = carry
        rng, sample_rng = jax.random.split(rng)
        logits = tokens_to_logits(params, seqs)
        sampled = jax.random.categorical(sample_rng, logits / temperature, axis=-1)
        unknown = seqs == mask_token_id
        sampled = jnp.where(unknown, sampled, seqs).astype(jnp.int32)
        ratio = (step + 1).astype(jnp.float32) / num_steps
        gamma = mask_schedule.schedule(ratio, unknown_at_start, schedule)
        mask_len = jnp.floor(unknown_at_start * gamma).astype(jnp.int32)
        still_unknown = jnp.sum(unknown, axis=-1, keepdims=True)
        mask_len = jnp.maximum(1, jnp.minimum(still_unknown - 1, mask_len))
        score = jnp.where(unknown, order_score[None, :], jnp.inf)
        cut_off = jnp.take_along_axis(
            jnp.sort(score, axis=-1), jnp.clip(mask_len, 0, length - 1), axis=-1
        )
        return jnp.where(score < cut_off, mask_token_id, sampled), rng, sampled

    carry = (inputs.astype(jnp.int32), rng, inputs.astype(jnp.int32))
    return jax.lax.fori_loop(start_step, num_steps, body, carry)[2]


# ----------------------------------------------------------------------------------------------
# The pipeline.


class MaskGITPipeline:
    """Class-conditional MaskGIT sampling and editing from a config and both models' weights.

    Args:
        config: the models' config (`config_lib.base_config()` layout).
        tokenizer_variables: `{"params": ...}` of the VQGAN tokenizer.
        transformer_variables: `{"params": ...}` of the masked transformer.
        devices: devices of the 1-D batch mesh (default: all local devices).
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        tokenizer_variables: Any,
        transformer_variables: Any,
        devices: Sequence[jax.Device] | None = None,
    ):
        self.config = config
        self.tokenizer = build_tokenizer(config)
        self.transformer = build_transformer(config)
        self.factor = self.tokenizer.downsample_factor
        self.grid_side = config_lib.tokens_per_side(config)
        self.codebook_size = config.tokenizer.codebook_size
        self.mask_token_id = config_lib.mask_token_id(config)
        devices = list(devices) if devices is not None else jax.local_devices()
        self.mesh = Mesh(np.asarray(devices), (_BATCH_AXIS,))
        self._batch_sharding = NamedSharding(self.mesh, PartitionSpec(_BATCH_AXIS))
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self.tokenizer_variables = jax.device_put(
            sharding.strip_boxes(tokenizer_variables), replicated
        )
        self.transformer_variables = jax.device_put(
            sharding.strip_boxes(transformer_variables), replicated
        )
        self._logits_fns: dict[tuple[int | None, bool], _CodebookLogits] = {}

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, directory: str | epath.PathLike, devices: Sequence[jax.Device] | None = None
    ) -> MaskGITPipeline:
        """Loads a pretrained directory of this project (config.json, tokenizer, transformer)."""
        loaded = pretrained.load_pretrained(directory)
        return cls(loaded.config, loaded.tokenizer_variables, loaded.transformer_variables, devices)

    @classmethod
    def from_official(
        cls,
        tokenizer_file: str,
        transformer_file: str,
        config: ml_collections.ConfigDict,
        devices: Sequence[jax.Device] | None = None,
    ) -> MaskGITPipeline:
        """Loads the authors' released msgpack files (local or gs://), checked against `config`."""
        tokenizer = official_checkpoint.load_official_tokenizer(tokenizer_file, config)
        transformer = official_checkpoint.load_official_transformer(transformer_file, config)
        return cls(config, tokenizer, transformer, devices)

    @classmethod
    def with_random_weights(
        cls,
        config: ml_collections.ConfigDict,
        seed: int = 0,
        scale: float = 0.5,
        devices: Sequence[jax.Device] | None = None,
    ) -> MaskGITPipeline:
        """Random N(0, scale^2) weights of the right shapes, for demos and tests (no init run)."""
        rng = np.random.default_rng(seed)

        def fill(tree):
            return jax.tree.map(lambda a: scale * rng.standard_normal(a.shape, np.float32), tree)

        tokenizer = fill(official_checkpoint.abstract_tokenizer_params(config))
        transformer = fill(official_checkpoint.abstract_transformer_params(config))
        return cls(config, tokenizer, transformer, devices)

    @property
    def num_devices(self) -> int:
        """Devices the batch is sharded over."""
        return self.mesh.devices.size

    @property
    def image_size(self) -> int:
        """The square image side the transformer was trained for."""
        return int(self.config.image_size)

    # -- batching and jitted pieces -------------------------------------------------------

    def _shard(self, array: np.ndarray) -> tuple[jax.Array, int]:
        """Pads the leading axis to a multiple of the device count and shards it."""
        array = np.asarray(array)
        size = array.shape[0]
        padded_size = -(-size // self.num_devices) * self.num_devices
        if padded_size != size:
            pad = np.repeat(array[-1:], padded_size - size, axis=0)
            array = np.concatenate([array, pad])
        return jax.device_put(array, self._batch_sharding), size

    def _logits_fn(self, top_k: int | None, guided: bool) -> _CodebookLogits:
        key = (top_k, guided)
        if key not in self._logits_fns:
            self._logits_fns[key] = _CodebookLogits(
                self.transformer, self.codebook_size, self.mask_token_id, top_k, guided
            )
        return self._logits_fns[key]

    @functools.partial(
        jax.jit,
        static_argnames=(
            "self",
            "logits_fn",
            "num_steps",
            "start_step",
            "schedule",
            "ordering",
        ),
    )
    def _fill_window(
        self,
        transformer_variables,
        inputs,
        rng,
        window_index,
        guidance_scale,
        choice_temperature,
        temperature,
        *,
        logits_fn,
        num_steps,
        start_step,
        schedule,
        ordering,
    ):
        """Decodes the unknown tokens of `inputs` [B, 1 + G*G], one key per row."""
        window_key = jax.random.fold_in(rng, window_index)
        keys = jax.vmap(lambda i: jax.random.fold_in(window_key, i))(jnp.arange(inputs.shape[0]))
        params = (transformer_variables, guidance_scale)
        if ordering == "halton":
            ranks = np.empty(self.grid_side**2, np.float32)
            ranks[halton_order(self.grid_side, self.grid_side)] = np.arange(ranks.size)
            # Sequence position 0 is the (always known) class token.
            order_score = jnp.asarray(np.concatenate([[0.0], -ranks]), jnp.float32)

        def one_row(row, key):
            if ordering == "halton":
                out = _order_decode(
                    row[None],
                    key,
                    logits_fn,
                    params,
                    order_score,
                    temperature,
                    mask_token_id=self.mask_token_id,
                    num_steps=num_steps,
                    start_step=start_step,
                    schedule=schedule,
                )
            else:
                out = decoding.decode(
                    row[None],
                    key,
                    logits_fn,
                    params,
                    mask_token_id=self.mask_token_id,
                    num_steps=num_steps,
                    start_step=start_step,
                    choice_temperature=choice_temperature,
                    schedule=schedule,
                    temperature=temperature,
                )
            return out[0]

        return jax.vmap(one_row)(inputs, keys)

    @functools.partial(jax.jit, static_argnames=("self",))
    def _encode(self, tokenizer_variables, images):
        return self.tokenizer.apply(tokenizer_variables, images, method="encode")

    @functools.partial(jax.jit, static_argnames=("self",))
    def _decode(self, tokenizer_variables, grid):
        images = self.tokenizer.apply(tokenizer_variables, grid, method="decode")
        return jnp.clip(images, 0.0, 1.0)

    def encode(self, images) -> np.ndarray:
        """Token grids int32 [B, H/f, W/f] of float images [B, H, W, 3] in [0, 1]."""
        images = self._check_images(images)
        sharded, size = self._shard(images)
        return np.asarray(self._encode(self.tokenizer_variables, sharded))[:size]

    def decode_tokens(self, tokens) -> np.ndarray:
        """Images float32 [B, h*f, w*f, 3] in [0, 1] of token grids [B, h, w]."""
        tokens = validation.check_token_ids(tokens, self.codebook_size)
        if tokens.ndim != 3:
            raise ValueError(f"tokens must be [B, h, w]; got shape {tokens.shape}.")
        sharded, size = self._shard(tokens)
        return np.asarray(self._decode(self.tokenizer_variables, sharded))[:size]

    # -- option checks --------------------------------------------------------------------

    def _options(
        self,
        num_steps,
        start_step,
        schedule,
        choice_temperature,
        temperature,
        top_k,
        guidance_scale,
        ordering,
        force_guidance,
    ) -> dict[str, Any]:
        """Validates decoding options on the host; returns them with defaults filled in."""
        sampling = self.config.sampling
        num_steps = sampling.num_steps if num_steps is None else num_steps
        validation.check_num_steps(num_steps, start_step)
        schedule = sampling.schedule if schedule is None else schedule
        mask_schedule.validate(schedule)
        if choice_temperature is None:
            choice_temperature = sampling.choice_temperature
        temperature = sampling.temperature if temperature is None else temperature
        if not (np.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be > 0; got {temperature}.")
        if not (np.isfinite(choice_temperature) and choice_temperature >= 0):
            raise ValueError(f"choice_temperature must be >= 0; got {choice_temperature}.")
        if top_k is not None and (isinstance(top_k, bool) or int(top_k) != top_k or not 1 <= top_k):
            raise ValueError(f"top_k must be an integer >= 1 or None; got {top_k}.")
        if not (np.isfinite(guidance_scale) and guidance_scale >= 0):
            raise ValueError(f"guidance_scale must be >= 0; got {guidance_scale}.")
        if guidance_scale > 0 and not force_guidance:
            dropout = self.config.get("training", {}).get("label_dropout", 0.0)
            if not dropout:
                raise ValueError(
                    f"guidance_scale={guidance_scale} needs a model trained with label dropout "
                    "(the unconditional input is the mask token in the class slot), but this "
                    "config has training.label_dropout=0. Pass force_guidance=True to guide "
                    "anyway."
                )
        if ordering not in ORDERINGS:
            raise ValueError(f"ordering must be one of {ORDERINGS}; got {ordering!r}.")
        top_k = None if top_k is None or top_k >= self.codebook_size else int(top_k)
        return dict(
            num_steps=int(num_steps),
            start_step=int(start_step),
            schedule=schedule,
            choice_temperature=float(choice_temperature),
            temperature=float(temperature),
            top_k=top_k,
            guidance_scale=float(guidance_scale),
            ordering=ordering,
        )

    def _check_images(self, images) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        images = validation.check_images(images)
        height, width = images.shape[1:3]
        if height % self.factor or width % self.factor:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the tokenizer's "
                f"downsampling factor {self.factor}."
            )
        return images

    def _labels(self, labels, batch: int) -> np.ndarray:
        labels = np.asarray(labels)
        if labels.ndim == 0:
            labels = np.full(batch, labels)
        labels = validation.check_labels(labels, self.config.num_classes)
        if labels.shape[0] != batch:
            raise ValueError(f"got {labels.shape[0]} labels for {batch} images.")
        return labels

    # -- decoding -------------------------------------------------------------------------

    def fill_tokens(
        self,
        tokens,
        token_mask,
        labels,
        rng: jax.Array,
        *,
        num_steps: int | None = None,
        start_step: int = 0,
        schedule: str | None = None,
        choice_temperature: float | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        guidance_scale: float = 0.0,
        ordering: str = "confidence",
        force_guidance: bool = False,
    ) -> np.ndarray:
        """Re-decodes the `token_mask` cells of token grids [B, h, w]; other cells are kept.

        Any grid size works: grids larger than the transformer's are filled window by window,
        smaller ones padded with unknown tokens. Options as in `generate`; returns int32
        [B, h, w].
        """
        options = self._options(
            num_steps,
            start_step,
            schedule,
            choice_temperature,
            temperature,
            top_k,
            guidance_scale,
            ordering,
            force_guidance,
        )
        token_mask = np.asarray(token_mask, bool)
        if token_mask.ndim != 3:
            raise ValueError(f"token_mask must be [B, h, w]; got shape {token_mask.shape}.")
        tokens = np.broadcast_to(np.asarray(tokens), token_mask.shape)
        tokens = validation.check_token_ids(tokens, self.codebook_size)
        batch, height, width = tokens.shape
        labels = self._labels(labels, batch)
        side = self.grid_side
        # The canvas, padded with unknown cells up to at least one window per side.
        canvas = np.full((batch, max(height, side), max(width, side)), self.mask_token_id)
        canvas[:, :height, :width] = np.where(token_mask, self.mask_token_id, tokens)
        class_tokens = (self.codebook_size + labels)[:, None]
        logits_fn = self._logits_fn(options["top_k"], options["guidance_scale"] > 0)
        window_index = 0
        for top in _window_starts(canvas.shape[1], side):
            for left in _window_starts(canvas.shape[2], side):
                window = canvas[:, top : top + side, left : left + side].reshape(batch, -1)
                if np.any(window == self.mask_token_id):
                    inputs, _ = self._shard(np.concatenate([class_tokens, window], axis=1))
                    filled = self._fill_window(
                        self.transformer_variables,
                        inputs,
                        rng,
                        window_index,
                        options["guidance_scale"],
                        options["choice_temperature"],
                        options["temperature"],
                        logits_fn=logits_fn,
                        num_steps=options["num_steps"],
                        start_step=options["start_step"],
                        schedule=options["schedule"],
                        ordering=options["ordering"],
                    )
                    filled = np.asarray(filled)[:batch, 1:].reshape(batch, side, side)
                    canvas[:, top : top + side, left : left + side] = filled
                window_index += 1
        return canvas[:, :height, :width].astype(np.int32)

    def generate_tokens(
        self, labels, rng: jax.Array, num_steps: int | None = None, **options
    ) -> np.ndarray:
        """Token grids int32 [B, G, G] for class `labels` [B]; options as in `generate`."""
        labels = validation.check_labels(labels, self.config.num_classes)
        side = self.grid_side
        shape = (labels.shape[0], side, side)
        return self.fill_tokens(
            np.zeros(shape, np.int32),
            np.ones(shape, bool),
            labels,
            rng,
            num_steps=num_steps,
            **options,
        )

    def generate(
        self,
        labels,
        rng: jax.Array,
        num_steps: int | None = None,
        *,
        schedule: str | None = None,
        choice_temperature: float | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        guidance_scale: float = 0.0,
        ordering: str = "confidence",
        force_guidance: bool = False,
    ) -> np.ndarray:
        """Images float32 [B, H, W, 3] in [0, 1] for class `labels` [B].

        Args:
            labels: int class ids [B] in [0, num_classes).
            rng: PRNG key; row i's image depends only on the key, i and labels[i].
            num_steps: decoding steps (default `config.sampling.num_steps`).
            schedule: mask schedule name (default `config.sampling.schedule`).
            choice_temperature: initial Gumbel scale of the confidence re-masking (default
                `config.sampling.choice_temperature`); unused by the Halton ordering.
            temperature: softmax temperature of token sampling (default from the config).
            top_k: sample among the k most likely codes only. The decoder's confidence is then
                the filtered probability: with `top_k=1` every confidence is 1, so with
                `choice_temperature=0` all tokens are revealed greedily in the first step
                (use `ordering="halton"` for multi-step greedy decoding).
            guidance_scale: classifier-free guidance s: logits = (1+s) cond - s uncond, the
                unconditional input having the mask token in the class slot. Needs a model
                trained with label dropout (`config.training.label_dropout > 0`).
            ordering: "confidence" (the paper: re-mask the least confident samples, with
                annealed Gumbel noise) or "halton" (reveal positions in the fixed Halton order
                of `halton_order`, deterministically).
            force_guidance: allow guidance although the config reports no label dropout.
        """
        tokens = self.generate_tokens(
            labels,
            rng,
            num_steps,
            schedule=schedule,
            choice_temperature=choice_temperature,
            temperature=temperature,
            top_k=top_k,
            guidance_scale=guidance_scale,
            ordering=ordering,
            force_guidance=force_guidance,
        )
        return self.decode_tokens(tokens)

    # -- editing --------------------------------------------------------------------------

    def _edit(
        self,
        images: np.ndarray,
        token_mask: np.ndarray,
        labels,
        rng: jax.Array,
        num_steps: int,
        start_step: int,
        blur_radius: float | None,
        return_details: bool,
        options: dict[str, Any],
    ) -> np.ndarray | EditResult:
        """Encodes, re-decodes the masked tokens, decodes and composites (the demo recipe)."""
        labels = self._labels(labels, images.shape[0])
        # Check every option before anything is compiled.
        self._options(num_steps, start_step, **_option_defaults(options))
        input_tokens = self.encode(images)
        tokens = self.fill_tokens(
            input_tokens,
            token_mask,
            labels,
            rng,
            num_steps=num_steps,
            start_step=start_step,
            **options,
        )
        generated = self.decode_tokens(tokens)
        radius = self.image_size / 16 - 1 if blur_radius is None else blur_radius
        output = composite(generated, images, token_mask, radius)
        if return_details:
            return EditResult(output, tokens, input_tokens, token_mask)
        return output

    def inpaint(
        self,
        image,
        mask,
        label,
        rng: jax.Array,
        num_steps: int = EDIT_NUM_STEPS,
        *,
        start_step: int = EDIT_START_STEP,
        blur_radius: float | None = None,
        return_details: bool = False,
        **options,
    ) -> np.ndarray | EditResult:
        """Regenerates the masked pixels of an image for a class; the rest is kept.

        Args:
            image: float [H, W, 3] or [B, H, W, 3] in [0, 1]; H and W multiples of the
                downsampling factor.
            mask: [H, W] or [B, H, W]; nonzero marks pixels to regenerate.
            label: class id (int, or one per image).
            rng: PRNG key.
            num_steps, start_step: decoding steps and the step to start at (demo: 12 and 2).
            blur_radius: compositing blur in pixels (default `config.image_size / 16 - 1`).
            return_details: return an `EditResult` (images, tokens, input tokens, token mask).
            **options: decoding options of `generate`.

        Returns:
            Composited images float32 [B, H, W, 3], or an `EditResult`.
        """
        images = self._check_images(image)
        mask = np.asarray(mask)
        if mask.ndim == 2:
            mask = mask[None]
        if mask.ndim != 3 or mask.shape[1:] != images.shape[1:3]:
            raise ValueError(
                f"mask must be [H, W] or [B, H, W] matching the image's {images.shape[1:3]}; "
                f"got shape {mask.shape}."
            )
        mask = np.broadcast_to(mask != 0, (images.shape[0],) + images.shape[1:3])
        token_mask = token_mask_from_pixels(mask, self.factor)
        return self._edit(
            images,
            token_mask,
            label,
            rng,
            num_steps,
            start_step,
            blur_radius,
            return_details,
            options,
        )

    def edit(
        self,
        image,
        box: Sequence[float],
        target_label,
        rng: jax.Array,
        num_steps: int = EDIT_NUM_STEPS,
        *,
        start_step: int = EDIT_START_STEP,
        blur_radius: float | None = None,
        return_details: bool = False,
        **options,
    ) -> np.ndarray | EditResult:
        """Class-conditional editing: redraws the pixel box (x0, y0, x1, y1) as `target_label`.

        x1 and y1 are exclusive; the box is widened to whole tokens plus one token of margin.
        Other arguments as in `inpaint`.
        """
        images = self._check_images(image)
        height, width = images.shape[1:3]
        box = tuple(float(v) for v in box)
        x0, y0, x1, y1 = box
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise ValueError(
                f"box (x0, y0, x1, y1)={box} must satisfy 0 <= x0 < x1 <= {width} and "
                f"0 <= y0 < y1 <= {height}."
            )
        cells = token_mask_from_box(box, height, width, self.factor)
        token_mask = np.broadcast_to(cells, (images.shape[0],) + cells.shape).copy()
        return self._edit(
            images,
            token_mask,
            target_label,
            rng,
            num_steps,
            start_step,
            blur_radius,
            return_details,
            options,
        )

    def outpaint(
        self,
        image,
        extend_left: int = 0,
        extend_right: int = 0,
        extend_top: int = 0,
        extend_bottom: int = 0,
        *,
        label,
        rng: jax.Array,
        num_steps: int = EDIT_NUM_STEPS,
        start_step: int = EDIT_START_STEP,
        fill_value: float = 0.5,
        blur_radius: float | None = None,
        return_details: bool = False,
        **options,
    ) -> np.ndarray | EditResult:
        """Extends the canvas by the given pixel counts and generates the new area.

        The extended canvas must be a multiple of the downsampling factor on both sides.
        Returns images [B, H + top + bottom, W + left + right, 3]; other arguments as in
        `inpaint` (`fill_value` is the grey the new area holds before encoding).
        """
        images = self._check_images(image)
        extends = (extend_left, extend_right, extend_top, extend_bottom)
        if any(isinstance(e, bool) or int(e) != e or e < 0 for e in extends):
            raise ValueError(f"extend values must be integers >= 0; got {extends}.")
        left, right, top, bottom = (int(e) for e in extends)
        batch, height, width = images.shape[:3]
        new_height, new_width = height + top + bottom, width + left + right
        if new_height % self.factor or new_width % self.factor:
            raise ValueError(
                f"the extended canvas {new_height}x{new_width} is not a multiple of the "
                f"tokenizer's downsampling factor {self.factor}; adjust the extend values."
            )
        canvas = np.full((batch, new_height, new_width, 3), fill_value, np.float32)
        canvas[:, top : top + height, left : left + width] = images
        new_area = np.ones((batch, new_height, new_width), bool)
        new_area[:, top : top + height, left : left + width] = False
        token_mask = token_mask_from_pixels(new_area, self.factor)
        return self._edit(
            canvas,
            token_mask,
            label,
            rng,
            num_steps,
            start_step,
            blur_radius,
            return_details,
            options,
        )


def _option_defaults(options: dict[str, Any]) -> dict[str, Any]:
    """The option keywords of `MaskGITPipeline._options` (besides the steps), with defaults."""
    known = (
        "schedule",
        "choice_temperature",
        "temperature",
        "top_k",
        "guidance_scale",
        "ordering",
        "force_guidance",
    )
    unknown = set(options) - set(known)
    if unknown:
        raise TypeError(f"unknown decoding options: {sorted(unknown)}; valid: {known}.")
    defaults = dict(
        schedule=None,
        choice_temperature=None,
        temperature=None,
        top_k=None,
        guidance_scale=0.0,
        ordering="confidence",
        force_guidance=False,
    )
    return {**defaults, **options}
