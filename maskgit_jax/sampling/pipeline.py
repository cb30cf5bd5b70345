"""The one MaskGIT sampler: class-conditional generation and image editing from loaded weights.

`MaskGITPipeline` holds a config with the tokenizer's and transformer's weights (replicated on
a 1-D mesh of this process's devices). Every path that turns labels into images goes through
it: notebooks, `python -m maskgit_jax.sample`, `evaluate`, the training sample grids and FID
during training, and the benchmarks. Options are one validated `DecodeOptions`
(`pipeline.options(...)`, defaults from `config.sampling`).

Keys are drawn one way everywhere: row i of a call with `row_offset=o` decodes with
`fold_in(fold_in(rng, window), o + i)` (window 0 unless a canvas is larger than the
transformer's grid). An image's tokens therefore depend on the key, its global row index, its
label and the options only: not on the batch it came in, the chunking, the padding, the number
of devices or of processes (a process sampling rows o..o+n of a list passes `row_offset=o`).
Its pixels are those tokens decoded, equal up to float rounding where the rows per device
differ.

Batches are cut into chunks of at most `max_batch_size` rows (4,000 labels never become one
jitted batch), padded to a multiple of the device count and sharded along a "batch" mesh axis;
each (chunk shape, options) compiles once, and later calls, new weights (`set_variables`) and
new temperatures or guidance scales reuse the program.

Images of any size that is a multiple of the tokenizer's downsampling factor can be edited.
The transformer sees a fixed token grid (`config.image_size / factor` per side), so larger
canvases are filled window by window (overlapping by half, in raster order, each window seeing
what the earlier ones revealed as known tokens) and smaller ones are padded with unknown
tokens that are decoded and then dropped.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from maskgit_jax import compile_options, config_lib, paths, sharding, validation
from maskgit_jax.checkpoints import official as official_checkpoint
from maskgit_jax.checkpoints import pretrained
from maskgit_jax.decoding import core, orders
from maskgit_jax.decoding.logits import (
    CodebookLogits,
    cast_matmul_kernels,
    rows_per_transformer_call,
)
from maskgit_jax.decoding.options import DecodeOptions
from maskgit_jax.models import build_tokenizer, build_transformer
from maskgit_jax.sampling import editing
from maskgit_jax.sampling.editing import EDIT_NUM_STEPS, EDIT_START_STEP, EditResult

_BATCH_AXIS = "batch"
_DECODE_STATIC_ARGNAMES = ("self", "logits_fn", "num_steps", "start_step", "schedule", "ordering")
# One program per compute dtype; the cast variables keep the input's (replicated) sharding.
_cast_kernels = jax.jit(cast_matmul_kernels, static_argnums=1)


def _on_own_mesh(method):
    """Runs a pipeline method under the pipeline's mesh and no logical-axis rules.

    Callers may sit inside another mesh (the training loop's, a metric's): the sampler's
    programs are laid out on its own devices whatever is current.
    """

    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(()):
            return method(self, *args, **kwargs)

    return wrapped


# Rows per jitted decoding program unless the caller says otherwise.
DEFAULT_MAX_BATCH_SIZE = 64


def _host_rows(chunks: list[tuple[int, jax.Array]]) -> np.ndarray:
    """The first `count` rows of each (count, device array) chunk, concatenated on the host.

    Callers dispatch every chunk before this reads the first back.
    """
    return np.concatenate([np.asarray(chunk)[:count] for count, chunk in chunks])


class MaskGITPipeline:
    """Class-conditional MaskGIT sampling and editing from a config and both models' weights.

    Args:
        config: the models' config (`config_lib.base_config()` layout).
        tokenizer_variables: `{"params": ...}` of the VQGAN tokenizer.
        transformer_variables: `{"params": ...}` of the masked transformer.
        devices: devices of the 1-D batch mesh (default: this process's devices).
        max_batch_size: most rows decoded, encoded or turned into images by one program;
            larger batches are chunked.
        keep_cast_weights: keep the transformer's matmul kernels cast to a compute dtype
            other than float32 (bf16: half the float32 kernels' memory, 350 MB for imagenet256)
            from one call to the next while the weights stay the same. False casts them once
            per call instead: for a sampler whose weights change between calls (training's).
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        tokenizer_variables: Any,
        transformer_variables: Any,
        devices: Sequence[jax.Device] | None = None,
        *,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        keep_cast_weights: bool = True,
    ):
        self.config = config
        self.keep_cast_weights = keep_cast_weights
        self.tokenizer = build_tokenizer(config)
        self.factor = self.tokenizer.downsample_factor
        self.grid_side = config_lib.tokens_per_side(config)
        self.codebook_size = config.tokenizer.codebook_size
        self.mask_token_id = config_lib.mask_token_id(config)
        devices = list(devices) if devices is not None else jax.local_devices()
        self.mesh = Mesh(np.asarray(devices), (_BATCH_AXIS,))
        self._platform = devices[0].platform
        self._batch_sharding = NamedSharding(self.mesh, PartitionSpec(_BATCH_AXIS))
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int):
            raise ValueError(f"max_batch_size must be an integer; got {max_batch_size!r}.")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1; got {max_batch_size}.")
        # A multiple of the device count, so that every chunk splits evenly.
        self.max_batch_size = -(-max_batch_size // self.num_devices) * self.num_devices
        # The float32 transformer module; other compute dtypes are built when first asked for.
        self.transformer = build_transformer(config)
        self._transformers: dict[str, Any] = {"float32": self.transformer}
        self._logits_fns: dict[tuple[str, int | None, bool], CodebookLogits] = {}
        self._decode_programs: dict[tuple[tuple[str, str], ...], Callable] = {}
        # The tokenizer runs in float32: its programs take float32's XLA options on this mesh.
        tokenizer_options = compile_options.forward_options(jnp.float32, self._platform)
        self._encode = jax.jit(self._encode_images, compiler_options=tokenizer_options)
        self._decode = jax.jit(self._decode_grid, compiler_options=tokenizer_options)
        self.tokenizer_variables = None
        self.transformer_variables = None
        # (the transformer variables they were cast from, {dtype name: cast variables}).
        self._cast_weights: tuple[Any, dict[str, Any]] = (None, {})
        self.set_variables(tokenizer_variables, transformer_variables)

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, directory: str | epath.PathLike, devices: Sequence[jax.Device] | None = None, **kw
    ) -> MaskGITPipeline:
        """Loads a pretrained directory of this project (config.json, tokenizer, transformer)."""
        loaded = pretrained.load_pretrained(paths.absolute(directory))
        return cls(
            loaded.config, loaded.tokenizer_variables, loaded.transformer_variables, devices, **kw
        )

    @classmethod
    def from_official(
        cls,
        tokenizer_file: str,
        transformer_file: str,
        config: ml_collections.ConfigDict,
        devices: Sequence[jax.Device] | None = None,
        **kw,
    ) -> MaskGITPipeline:
        """Loads the authors' released msgpack files (local or gs://), checked against `config`."""
        tokenizer = official_checkpoint.load_official_tokenizer(tokenizer_file, config)
        transformer = official_checkpoint.load_official_transformer(transformer_file, config)
        return cls(config, tokenizer, transformer, devices, **kw)

    @classmethod
    def with_random_weights(
        cls,
        config: ml_collections.ConfigDict,
        seed: int = 0,
        scale: float = 0.5,
        devices: Sequence[jax.Device] | None = None,
        **kw,
    ) -> MaskGITPipeline:
        """Random N(0, scale^2) weights of the right shapes, for demos and tests (no init run)."""
        rng = np.random.default_rng(seed)

        def fill(tree):
            return jax.tree.map(lambda a: scale * rng.standard_normal(a.shape, np.float32), tree)

        tokenizer = fill(official_checkpoint.abstract_tokenizer_params(config))
        transformer = fill(official_checkpoint.abstract_transformer_params(config))
        return cls(config, tokenizer, transformer, devices, **kw)

    def set_variables(
        self, tokenizer_variables: Any = None, transformer_variables: Any = None
    ) -> None:
        """Replaces the weights (None keeps them); compiled programs are reused.

        Host arrays, or arrays this process can read whole (`multihost.host_copy` first
        when they span processes), are replicated over the pipeline's devices.
        """
        if tokenizer_variables is not None:
            self.tokenizer_variables = jax.device_put(
                sharding.strip_boxes(tokenizer_variables), self._replicated
            )
        if transformer_variables is not None:
            self.transformer_variables = jax.device_put(
                sharding.strip_boxes(transformer_variables), self._replicated
            )

    @property
    def num_devices(self) -> int:
        """Devices the batch is sharded over."""
        return self.mesh.devices.size

    @property
    def image_size(self) -> int:
        """The square image side the transformer was trained for."""
        return int(self.config.image_size)

    # -- options --------------------------------------------------------------------------

    def options(self, *, force_guidance: bool = False, **overrides: Any) -> DecodeOptions:
        """Decoding options: `config.sampling` with `overrides` (None: the config's value).

        Guidance needs a model trained with label dropout (the unconditional input is the
        mask token in the class slot); `force_guidance=True` guides anyway.
        """
        return self._checked(DecodeOptions.from_config(self.config, **overrides), force_guidance)

    def _checked(self, options: DecodeOptions, force_guidance: bool) -> DecodeOptions:
        if not isinstance(options, DecodeOptions):
            raise ValueError(f"options must be a DecodeOptions; got {type(options).__name__}.")
        if options.guided and not force_guidance:
            dropout = self.config.get("training", {}).get("label_dropout", 0.0)
            if not dropout:
                raise ValueError(
                    f"guidance_scale={options.guidance_scale} needs a model trained with label "
                    "dropout (the unconditional input is the mask token in the class slot), "
                    "but this config has training.label_dropout=0. Pass force_guidance=True "
                    "to guide anyway."
                )
        return options

    def _resolve(self, options: DecodeOptions | None, overrides: dict[str, Any]) -> DecodeOptions:
        """`options` (or the config's) with keyword `overrides`, validated."""
        force_guidance = bool(overrides.pop("force_guidance", False))
        if options is None:
            return self.options(force_guidance=force_guidance, **overrides)
        if not isinstance(options, DecodeOptions):
            raise ValueError(f"options must be a DecodeOptions; got {type(options).__name__}.")
        return self._checked(options.replace(**overrides), force_guidance)

    # -- jitted pieces --------------------------------------------------------------------

    def _logits_fn(self, options: DecodeOptions) -> CodebookLogits:
        top_k = (
            None if options.top_k is None or options.top_k >= self.codebook_size else options.top_k
        )
        key = (options.dtype, top_k, options.guided)
        if key not in self._logits_fns:
            if options.dtype not in self._transformers:
                self._transformers[options.dtype] = build_transformer(
                    self.config, dtype=options.compute_dtype
                )
            self._logits_fns[key] = CodebookLogits(
                self._transformers[options.dtype],
                self.codebook_size,
                self.mask_token_id,
                top_k=top_k,
                guided=options.guided,
                rows_per_device=rows_per_transformer_call(
                    config_lib.sequence_length(self.config),
                    self.config.transformer.mlp_dim,
                    self._platform,
                ),
                num_devices=self.num_devices,
            )
        return self._logits_fns[key]

    def _decode_program(self, options: DecodeOptions) -> Callable:
        """`_decode_rows` jitted with the XLA options of `options.compute_dtype` on this mesh.

        One jit per option set (`compile_options.forward_options`), each caching its programs.
        """
        xla_options = compile_options.forward_options(options.compute_dtype, self._platform)
        key = tuple(sorted(xla_options.items()))
        if key not in self._decode_programs:
            self._decode_programs[key] = jax.jit(
                type(self)._decode_rows,
                static_argnames=_DECODE_STATIC_ARGNAMES,
                compiler_options=xla_options,
            )
        return self._decode_programs[key]

    def _cast_variables(self, dtype: Any) -> Any:
        """The transformer variables with their matmul kernels in `dtype`, cast once.

        Casting in every decoding program cost 161-195 ms of a bf16 imagenet256 call (batch 8,
        `benchmarks/op_profile.py --program decode`), about 2% of a T=8 call; the cast copy is
        kept for the next call while `transformer_variables` stay the same object
        (`keep_cast_weights`).
        """
        name = jnp.dtype(dtype).name
        if name == "float32":
            return self.transformer_variables
        source, cast = self._cast_weights
        if source is not self.transformer_variables:
            cast = {}
        if name not in cast:
            cast[name] = _cast_kernels(self.transformer_variables, jnp.dtype(dtype))
        if self.keep_cast_weights:
            self._cast_weights = (self.transformer_variables, cast)
        return cast[name]

    def _decode_cache_size(self) -> int:
        """How many decoding programs this pipeline has compiled (to check that calls reuse one)."""
        return sum(program._cache_size() for program in self._decode_programs.values())

    def _decode_rows(
        self,
        transformer_variables,
        inputs,
        rows,
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
        """Decodes the unknown tokens of `inputs` [B, 1 + G*G]; row i uses key `rows[i]`.

        `transformer_variables` come with their kernels in the compute dtype (`_cast_variables`).
        """
        window_key = jax.random.fold_in(rng, window_index)
        keys = jax.vmap(lambda row: jax.random.fold_in(window_key, row))(rows)
        order_score = None
        if ordering != "confidence":
            order_score = jnp.asarray(orders.named_order_score(ordering, self.grid_side))
        return core.decode_loop(
            inputs,
            keys,
            (transformer_variables, guidance_scale),
            choice_temperature,
            temperature,
            order_score,
            tokens_to_logits=logits_fn,
            mask_token_id=self.mask_token_id,
            num_steps=num_steps,
            start_step=start_step,
            schedule=schedule,
            per_row_keys=True,
            return_all_steps=False,
        )[0]

    def _encode_images(self, tokenizer_variables, images):
        return self.tokenizer.apply(tokenizer_variables, images, method="encode")

    def _decode_grid(self, tokenizer_variables, grid):
        images = self.tokenizer.apply(tokenizer_variables, grid, method="decode")
        return jnp.clip(images, 0.0, 1.0)

    def _shard(self, array: np.ndarray, size: int | None = None) -> jax.Array:
        """Pads the leading axis (repeating the last row) to `size` or the next device multiple."""
        array = np.asarray(array)
        count = array.shape[0]
        if size is None:
            size = -(-count // self.num_devices) * self.num_devices
        if size != count:
            array = np.concatenate([array, np.repeat(array[-1:], size - count, axis=0)])
        return jax.device_put(array, self._batch_sharding)

    def _chunks(self, count: int) -> tuple[int, list[tuple[int, int]]]:
        """The padded chunk size and the (start, end) row ranges of a batch of `count` rows."""
        padded = -(-count // self.num_devices) * self.num_devices
        size = min(self.max_batch_size, padded)
        return size, [(start, min(start + size, count)) for start in range(0, count, size)]

    def _decode_sequences(
        self,
        sequences: np.ndarray,
        rng: jax.Array,
        options: DecodeOptions,
        *,
        row_offset: int,
        window_index: int = 0,
    ) -> list[tuple[int, jax.Array]]:
        """Decodes sequences [B, 1 + G*G] chunk by chunk: [(rows in chunk, device tokens)].

        Every chunk has the same padded shape, so one program serves them all.
        """
        logits_fn = self._logits_fn(options)
        variables = self._cast_variables(options.compute_dtype)
        size, ranges = self._chunks(len(sequences))
        # A key made under another mesh (the training loop's) moves to this one.
        rng = jax.device_put(rng, self._replicated)
        out = []
        for start, end in ranges:
            rows = np.arange(row_offset + start, row_offset + start + size, dtype=np.int32)
            tokens = self._decode_program(options)(
                self,
                variables,
                self._shard(sequences[start:end], size),
                self._shard(rows),
                rng,
                np.int32(window_index),
                np.float32(options.guidance_scale),
                np.float32(options.choice_temperature),
                np.float32(options.temperature),
                logits_fn=logits_fn,
                num_steps=options.num_steps,
                start_step=options.start_step,
                schedule=options.schedule,
                ordering=options.ordering,
            )
            out.append((end - start, tokens))
        return out

    def _class_sequences(self, labels: np.ndarray) -> np.ndarray:
        """Sequences [B, 1 + G*G]: the class token `codebook_size + label`, all else unknown."""
        masked = np.full((len(labels), self.grid_side**2), self.mask_token_id, np.int32)
        return np.concatenate([(self.codebook_size + labels)[:, None], masked], axis=1)

    # -- generation -----------------------------------------------------------------------

    def _check_row_offset(self, row_offset: Any) -> int:
        if isinstance(row_offset, bool) or not isinstance(row_offset, int | np.integer):
            raise ValueError(f"row_offset must be an integer >= 0; got {row_offset!r}.")
        if row_offset < 0:
            raise ValueError(f"row_offset must be >= 0; got {row_offset}.")
        return int(row_offset)

    def _class_chunks(self, labels, rng, options, row_offset, overrides):
        """Checks a generation request, then decodes it: [(rows, device token grids)]."""
        labels = validation.check_labels(labels, self.config.num_classes)
        options = self._resolve(options, overrides)
        row_offset = self._check_row_offset(row_offset)
        chunks = self._decode_sequences(
            self._class_sequences(labels), rng, options, row_offset=row_offset
        )
        side = self.grid_side
        return [(count, tokens[:, 1:].reshape(-1, side, side)) for count, tokens in chunks]

    @_on_own_mesh
    def sample(
        self,
        labels,
        rng: jax.Array,
        options: DecodeOptions | None = None,
        *,
        row_offset: int = 0,
        **overrides: Any,
    ) -> jax.Array:
        """Images [B, H, W, 3] in [0, 1] left on the pipeline's devices (for evaluation).

        Same images as `generate`; the batch is split over the devices (padding rows
        dropped), so a classifier on the same mesh can read them without a host copy.
        """
        images = [
            self._decode(self.tokenizer_variables, grid)[:count]
            for count, grid in self._class_chunks(labels, rng, options, row_offset, overrides)
        ]
        return images[0] if len(images) == 1 else jnp.concatenate(images)

    @_on_own_mesh
    def generate(
        self,
        labels,
        rng: jax.Array,
        options: DecodeOptions | None = None,
        *,
        row_offset: int = 0,
        **overrides: Any,
    ) -> np.ndarray:
        """Images float32 [B, H, W, 3] in [0, 1] for class `labels` [B].

        Args:
            labels: int class ids [B] in [0, num_classes).
            rng: PRNG key; row i's image depends only on the key, row_offset + i, labels[i]
                and the options.
            options: a `DecodeOptions` (default: `self.options()`, i.e. config.sampling).
            row_offset: global index of row 0 (a process sampling its share of a list).
            **overrides: option fields on top of `options` (num_steps, schedule,
                choice_temperature, temperature, ordering, guidance_scale, top_k, dtype),
                and `force_guidance=True` to guide a model trained without label dropout.
                With `top_k=1` every confidence is 1, so with `choice_temperature=0` all
                tokens are revealed greedily in the first step (use `ordering="halton"` for
                multi-step greedy decoding).
        """
        # Every chunk's decoding is dispatched before the first is read back.
        images = [
            (count, self._decode(self.tokenizer_variables, grid))
            for count, grid in self._class_chunks(labels, rng, options, row_offset, overrides)
        ]
        return _host_rows(images)

    @_on_own_mesh
    def generate_tokens(
        self,
        labels,
        rng: jax.Array,
        options: DecodeOptions | None = None,
        *,
        row_offset: int = 0,
        **overrides: Any,
    ) -> np.ndarray:
        """Token grids int32 [B, G, G] for class `labels` [B]; arguments as in `generate`."""
        return _host_rows(self._class_chunks(labels, rng, options, row_offset, overrides))

    @_on_own_mesh
    def fill_tokens(
        self,
        tokens,
        token_mask,
        labels,
        rng: jax.Array,
        options: DecodeOptions | None = None,
        *,
        row_offset: int = 0,
        **overrides: Any,
    ) -> np.ndarray:
        """Re-decodes the `token_mask` cells of token grids [B, h, w]; other cells are kept.

        Any grid size works: grids larger than the transformer's are filled window by window,
        smaller ones padded with unknown tokens. Returns int32 [B, h, w].
        """
        options = self._resolve(options, overrides)
        row_offset = self._check_row_offset(row_offset)
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
        window_index = 0
        for top in editing.window_starts(canvas.shape[1], side):
            for left in editing.window_starts(canvas.shape[2], side):
                window = canvas[:, top : top + side, left : left + side].reshape(batch, -1)
                if np.any(window == self.mask_token_id):
                    decoded = self._decode_sequences(
                        np.concatenate([class_tokens, window], axis=1),
                        rng,
                        options,
                        row_offset=row_offset,
                        window_index=window_index,
                    )
                    filled = np.concatenate([np.asarray(t)[:count, 1:] for count, t in decoded])
                    canvas[:, top : top + side, left : left + side] = filled.reshape(
                        batch, side, side
                    )
                window_index += 1
        return canvas[:, :height, :width].astype(np.int32)

    # -- tokenizer ------------------------------------------------------------------------

    @_on_own_mesh
    def encode(self, images) -> np.ndarray:
        """Token grids int32 [B, H/f, W/f] of float images [B, H, W, 3] in [0, 1]."""
        return self._tokenizer_in_chunks(self._encode, self._check_images(images))

    @_on_own_mesh
    def decode_tokens(self, tokens) -> np.ndarray:
        """Images float32 [B, h*f, w*f, 3] in [0, 1] of token grids [B, h, w]."""
        tokens = validation.check_token_ids(tokens, self.codebook_size)
        if tokens.ndim != 3:
            raise ValueError(f"tokens must be [B, h, w]; got shape {tokens.shape}.")
        return self._tokenizer_in_chunks(self._decode, tokens)

    def _tokenizer_in_chunks(self, program: Any, rows: np.ndarray) -> np.ndarray:
        """`program(tokenizer_variables, chunk)` over chunks of at most `max_batch_size` rows.

        Every chunk has the same padded shape, so one program serves any batch size, and a
        large batch never becomes one large set of activations. All chunks are dispatched
        before the first result is fetched.
        """
        size, ranges = self._chunks(len(rows))
        return _host_rows(
            [
                (end - start, program(self.tokenizer_variables, self._shard(rows[start:end], size)))
                for start, end in ranges
            ]
        )

    # -- input checks ---------------------------------------------------------------------

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

    # -- editing --------------------------------------------------------------------------

    def _edit(
        self,
        images: np.ndarray,
        token_mask: np.ndarray,
        labels,
        rng: jax.Array,
        options: DecodeOptions,
        blur_radius: float | None,
        return_details: bool,
        row_offset: int,
    ) -> np.ndarray | EditResult:
        """Encodes, re-decodes the masked tokens, decodes and composites (the demo recipe)."""
        labels = self._labels(labels, images.shape[0])
        input_tokens = self.encode(images)
        tokens = self.fill_tokens(
            input_tokens, token_mask, labels, rng, options, row_offset=row_offset
        )
        generated = self.decode_tokens(tokens)
        radius = self.image_size / 16 - 1 if blur_radius is None else blur_radius
        output = editing.composite(generated, images, token_mask, radius)
        if return_details:
            return EditResult(output, tokens, input_tokens, token_mask)
        return output

    def _edit_options(self, options: DecodeOptions | None, overrides: dict[str, Any]):
        """Options of an edit: without `options`, the demo's 12 steps from step 2 by default."""
        if options is None:
            for name, default in (("num_steps", EDIT_NUM_STEPS), ("start_step", EDIT_START_STEP)):
                if overrides.get(name) is None:
                    overrides[name] = default
        return self._resolve(options, overrides)

    def inpaint(
        self,
        image,
        mask,
        label,
        rng: jax.Array,
        options: DecodeOptions | None = None,
        *,
        blur_radius: float | None = None,
        return_details: bool = False,
        row_offset: int = 0,
        **overrides: Any,
    ) -> np.ndarray | EditResult:
        """Regenerates the masked pixels of an image for a class; the rest is kept.

        Args:
            image: float [H, W, 3] or [B, H, W, 3] in [0, 1]; H and W multiples of the
                downsampling factor.
            mask: [H, W] or [B, H, W]; nonzero marks pixels to regenerate.
            label: class id (int, or one per image).
            rng: PRNG key.
            options: decoding options; by default the config's, with the demo's
                `num_steps=12, start_step=2` (keywords override either).
            blur_radius: compositing blur in pixels (default `config.image_size / 16 - 1`).
            return_details: return an `EditResult` (images, tokens, input tokens, token mask).
            row_offset: global index of row 0, for keys drawn as in `generate`.
            **overrides: option fields, as in `generate`.

        Returns:
            Composited images float32 [B, H, W, 3], or an `EditResult`.
        """
        options = self._edit_options(options, overrides)
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
        token_mask = editing.token_mask_from_pixels(mask, self.factor)
        return self._edit(
            images, token_mask, label, rng, options, blur_radius, return_details, row_offset
        )

    def edit(
        self,
        image,
        box: Sequence[float],
        target_label,
        rng: jax.Array,
        options: DecodeOptions | None = None,
        *,
        blur_radius: float | None = None,
        return_details: bool = False,
        row_offset: int = 0,
        **overrides: Any,
    ) -> np.ndarray | EditResult:
        """Class-conditional editing: redraws the pixel box (x0, y0, x1, y1) as `target_label`.

        x1 and y1 are exclusive; the box is widened to whole tokens plus one token of margin.
        Other arguments as in `inpaint`.
        """
        options = self._edit_options(options, overrides)
        images = self._check_images(image)
        height, width = images.shape[1:3]
        box = tuple(float(v) for v in box)
        x0, y0, x1, y1 = box
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise ValueError(
                f"box (x0, y0, x1, y1)={box} must satisfy 0 <= x0 < x1 <= {width} and "
                f"0 <= y0 < y1 <= {height}."
            )
        cells = editing.token_mask_from_box(box, height, width, self.factor)
        token_mask = np.broadcast_to(cells, (images.shape[0],) + cells.shape).copy()
        return self._edit(
            images, token_mask, target_label, rng, options, blur_radius, return_details, row_offset
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
        options: DecodeOptions | None = None,
        fill_value: float = 0.5,
        blur_radius: float | None = None,
        return_details: bool = False,
        row_offset: int = 0,
        **overrides: Any,
    ) -> np.ndarray | EditResult:
        """Extends the canvas by the given pixel counts and generates the new area.

        The extended canvas must be a multiple of the downsampling factor on both sides.
        Returns images [B, H + top + bottom, W + left + right, 3]; other arguments as in
        `inpaint` (`fill_value` is the grey the new area holds before encoding).
        """
        options = self._edit_options(options, overrides)
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
        token_mask = editing.token_mask_from_pixels(new_area, self.factor)
        return self._edit(
            canvas, token_mask, label, rng, options, blur_radius, return_details, row_offset
        )
