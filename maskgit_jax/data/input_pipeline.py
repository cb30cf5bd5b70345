"""Deterministic, restartable tf.data input pipeline for tokenizer and transformer training.

Sources: any prepared TFDS dataset (imagenet2012 is prepared from its manual tars), the
bundled scikit-learn `digits` builder, and an image folder `root/<split>/<class>/*.png|jpg`.

Train order is a pure function of (seed, process, epoch): each epoch randomly merges 16
contiguous slices of the process's shard and permutes blocks of `shuffle_buffer` examples,
both seeded from (seed, process_index, epoch); crops and flips use stateless randomness keyed by
(seed, process_index, epoch, position). Resuming at step k therefore only recomputes the
epoch and skips the undecoded records before the offset, and yields exactly the batches a
run that never stopped would have seen.

With `global_order` set, every process instead builds the single-process stream over the
whole split (order from (seed, epoch), augmentation from (seed, epoch, position), process
index 0 and count 1 in the keys), batches it with the global batch size and keeps only its
rows [process_index * b, (process_index + 1) * b) of each batch (rows are dropped before
decoding). The concatenation of the processes' local batches in process order is then the
same for every process count, and equals the default stream of a single process. Eval does
the same: global batches padded to a multiple of the global batch size, sliced by rows.

Preprocessing is the usual ImageNet recipe the MaskGIT authors used: train takes a random
square crop of side min(h, w) (the same as resizing the shorter side and random-cropping)
and a horizontal flip, then resizes to `image_size` with antialiasing; eval takes the center
square. Images are float32 RGB in [0, 1]; grayscale and RGBA are converted to RGB.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import maskgit_jax.data.datasets  # noqa: F401  Registers the local `digits` builder with tfds.

# Files the imagenet2012 builder needs in its manual directory.
IMAGENET_TRAIN_TAR = "ILSVRC2012_img_train.tar"
IMAGENET_VAL_TAR = "ILSVRC2012_img_val.tar"
# Image file extensions the folder source reads (compared in lower case).
FOLDER_EXTENSIONS = (".png", ".jpg", ".jpeg")
# Split names tried, in order, when `eval_split` is None.
EVAL_SPLIT_CANDIDATES = ("validation", "test", "val")
# Number of contiguous slices of a process shard that each train epoch randomly merges.
NUM_MERGED_SLICES = 16

# TF must not take accelerator memory from JAX (a no-op for tensorflow-cpu).
tf.config.set_visible_devices([], "GPU")


@dataclasses.dataclass(frozen=True)
class PipelineInfo:
    """What the training loop needs to know about the data it gets."""

    name: str
    num_classes: int
    train_split: str
    eval_split: str | None
    # Whole-split sizes (all processes together).
    num_train_examples: int
    num_eval_examples: int
    global_batch_size: int
    local_batch_size: int
    # Global steps per pass over the train split (the remainder is carried to the next).
    steps_per_epoch: int
    # Eval batches every process yields (the same count on all, padded with mask=False).
    num_eval_batches: int
    start_step: int
    # Whether global batches are independent of the process count (`config.global_order`).
    global_order: bool = False


@dataclasses.dataclass(frozen=True)
class _Source:
    """A split-indexable image source: `read(split, start, end)` gives undecoded examples."""

    name: str
    num_classes: int
    split_sizes: Mapping[str, int]
    # Returns {"image": encoded bytes, "label": int64} for examples [start, end) of a split.
    read: Callable[[str, int, int], tf.data.Dataset]


def _tf_options() -> tf.data.Options:
    """Returns options that keep element order deterministic under parallel maps."""
    options = tf.data.Options()
    options.deterministic = True
    options.threading.max_intra_op_parallelism = 1
    return options


def _default_data_dir() -> str:
    """Returns tfds's default data directory, as tfds itself resolves it."""
    return os.path.expanduser(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


def _builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    """Returns the tfds builder, turning tfds's long not-found message into a short one."""
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"Unknown dataset name {name!r}: it is neither a registered TFDS dataset nor "
            "one of this pipeline's sources. Use 'digits' (bundled, offline), 'folder' "
            "(config.dataset.folder = root/<split>/<class>/*.png), 'imagenet2012', or a "
            "TFDS name."
        ) from None


def _missing_imagenet_files(manual_dir: str) -> list[str]:
    """Returns the imagenet2012 tars absent from `manual_dir`."""
    return [
        f
        for f in (IMAGENET_TRAIN_TAR, IMAGENET_VAL_TAR)
        if not os.path.isfile(os.path.join(manual_dir, f))
    ]


def _prepare_tfds(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """Returns a prepared builder; prepares offline-buildable ones, never downloads."""
    name = config.name
    builder = _builder(name, config.data_dir)
    if builder.is_prepared():
        return builder
    if name.split("/")[0] in ("digits", "photos"):
        builder.download_and_prepare()  # Reads scikit-learn's bundled copy; no network.
    elif name == "imagenet2012":
        data_dir = config.data_dir or _default_data_dir()
        manual_dir = config.manual_dir or os.path.join(data_dir, "downloads", "manual")
        missing = _missing_imagenet_files(manual_dir)
        if missing:
            raise FileNotFoundError(
                f"imagenet2012 is not prepared in {data_dir} and the manual download is "
                f"incomplete: missing {', '.join(missing)} in {manual_dir}. Download them "
                "from https://image-net.org and put them in that directory (or set "
                "config.dataset.manual_dir to where they are)."
            )
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
        )
    else:
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared in {config.data_dir or _default_data_dir()}"
            " and this pipeline never downloads. Prepare it on a machine with network access "
            f"(`tfds build {name} --data_dir=<dir>`) and copy it there, or use 'digits' or "
            "'folder'."
        )
    return builder


def _tfds_source(config: ml_collections.ConfigDict) -> _Source:
    """Returns a source reading undecoded images and labels from a prepared tfds dataset."""
    builder = _prepare_tfds(config)
    features = builder.info.features
    if "image" not in features or not isinstance(features["image"], tfds.features.Image):
        raise ValueError(f"TFDS dataset {config.name!r} has no 'image' Image feature.")
    has_label = "label" in features and isinstance(features["label"], tfds.features.ClassLabel)
    num_classes = features["label"].num_classes if has_label else 1
    split_sizes = {s: info.num_examples for s, info in builder.info.splits.items()}
    read_config = tfds.ReadConfig(options=_tf_options(), try_autocache=False, skip_prefetch=True)

    def read(split: str, start: int, end: int) -> tf.data.Dataset:
        ds = builder.as_dataset(
            split=f"{split}[{start}:{end}]",
            shuffle_files=False,
            decoders={"image": tfds.decode.SkipDecoding()},
            read_config=read_config,
        )

        def select(ex):
            label = ex["label"] if has_label else tf.constant(0, tf.int64)
            return {"image": ex["image"], "label": tf.cast(label, tf.int64)}

        return ds.map(select)

    return _Source(config.name, num_classes, split_sizes, read)


def _folder_source(config: ml_collections.ConfigDict) -> _Source:
    """Returns a source over root/<split>/<class>/*; classes are the train split's, sorted."""
    root = config.folder
    if not root or not os.path.isdir(root):
        raise FileNotFoundError(
            f"config.dataset.folder={root!r} is not a directory; the folder source needs "
            "root/<split>/<class>/*.png|jpg."
        )
    train_dir = os.path.join(root, config.train_split)
    if not os.path.isdir(train_dir):
        raise FileNotFoundError(f"Folder source: split directory {train_dir} is missing.")
    classes = sorted(d for d in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, d)))
    files: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in sorted(os.listdir(root)):
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            continue
        paths, labels = [], []
        for label, cls in enumerate(classes):
            cls_dir = os.path.join(split_dir, cls)
            if not os.path.isdir(cls_dir):
                continue
            for f in sorted(os.listdir(cls_dir)):
                if f.lower().endswith(FOLDER_EXTENSIONS):
                    paths.append(os.path.join(cls_dir, f))
                    labels.append(label)
        if split == config.train_split and not paths:
            raise FileNotFoundError(
                f"Folder source: {train_dir} holds no class subfolders with "
                f"{'/'.join(FOLDER_EXTENSIONS)} images."
            )
        if paths:
            # A fixed permutation (independent of the training seed) mixes classes before the
            # split is cut into process shards, as tfds does when it writes a dataset.
            order = np.random.default_rng(0).permutation(len(paths))
            files[split] = (np.asarray(paths)[order], np.asarray(labels, np.int64)[order])

    def read(split: str, start: int, end: int) -> tf.data.Dataset:
        paths, labels = files[split]
        ds = tf.data.Dataset.from_tensor_slices((paths[start:end], labels[start:end]))
        return ds.map(lambda p, y: {"image": tf.io.read_file(p), "label": y})

    return _Source("folder", len(classes), {s: len(f[0]) for s, f in files.items()}, read)


def _open_source(config: ml_collections.ConfigDict) -> _Source:
    """Returns the configured source, preparing it if that needs no download."""
    if config.name == "folder":
        return _folder_source(config)
    return _tfds_source(config)


def _shard_range(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
    """Returns [start, end) of a process's contiguous shard; sizes differ by at most one."""
    start = num_examples * process_index // process_count
    end = num_examples * (process_index + 1) // process_count
    return start, end


def _decode(image_bytes: tf.Tensor) -> tf.Tensor:
    """Decodes PNG/JPEG/GIF/BMP bytes to uint8 RGB [h, w, 3] (gray and RGBA become RGB)."""
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    return tf.ensure_shape(image, [None, None, 3])


def _square_crop_resize(image: tf.Tensor, top: tf.Tensor, left: tf.Tensor, size: int):
    """Crops the square of side min(h, w) at (top, left) and resizes it to size x size."""
    shape = tf.shape(image)
    side = tf.minimum(shape[0], shape[1])
    crop = tf.image.crop_to_bounding_box(image, top, left, side, side)
    resized = tf.image.resize(crop, [size, size], method="bilinear", antialias=True)
    return tf.clip_by_value(resized / 255.0, 0.0, 1.0)


def preprocess_train(
    image_bytes: tf.Tensor, key: tf.Tensor, image_size: int, random_crop: bool, random_flip: bool
) -> tf.Tensor:
    """Decodes, random-square-crops, flips and resizes; randomness is stateless from `key`."""
    image = _decode(image_bytes)
    shape = tf.shape(image)
    side = tf.minimum(shape[0], shape[1])
    crop_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
    if random_crop:
        top = tf.random.stateless_uniform([], crop_key, maxval=shape[0] - side + 1, dtype=tf.int32)
        left = tf.random.stateless_uniform(
            [],
            tf.random.experimental.stateless_fold_in(crop_key, 1),
            maxval=shape[1] - side + 1,
            dtype=tf.int32,
        )
    else:
        top, left = (shape[0] - side) // 2, (shape[1] - side) // 2
    image = _square_crop_resize(image, top, left, image_size)
    if random_flip:
        flip = tf.random.stateless_uniform([], flip_key) < 0.5
        image = tf.cond(flip, lambda: tf.image.flip_left_right(image), lambda: image)
    return image


def preprocess_eval(image_bytes: tf.Tensor, image_size: int) -> tf.Tensor:
    """Decodes, center-square-crops and resizes (resize shorter side + center crop)."""
    image = _decode(image_bytes)
    shape = tf.shape(image)
    side = tf.minimum(shape[0], shape[1])
    return _square_crop_resize(image, (shape[0] - side) // 2, (shape[1] - side) // 2, image_size)


def _keep_rows(
    ds: tf.data.Dataset, global_batch_size: int, local_batch_size: int, process_index: int
) -> tf.data.Dataset:
    """Keeps the elements that land in rows [p * local, (p + 1) * local) of global batches.

    `ds` must start at a global batch boundary; elements are dropped before any decoding.
    """
    first = process_index * local_batch_size

    def keep(k: tf.Tensor, _) -> tf.Tensor:
        row = k % global_batch_size
        return tf.logical_and(row >= first, row < first + local_batch_size)

    return ds.enumerate().filter(keep).map(lambda _, x: x)


def _block_shuffle(ds: tf.data.Dataset, block: int, key: tf.Tensor) -> tf.data.Dataset:
    """Permutes each run of `block` examples by stateless random keys derived from `key`.

    Unlike `Dataset.shuffle` with a tensor seed, this does not depend on TF's global seed
    (which `tf.random.set_seed` or `keras.utils.set_random_seed` anywhere in the process
    would otherwise make fail at graph construction).
    """

    def permute(index, examples):
        count = tf.shape(tf.nest.flatten(examples)[0])[0]
        scores = tf.random.stateless_uniform(
            [count], tf.random.experimental.stateless_fold_in(key, index)
        )
        order = tf.argsort(scores)
        return tf.nest.map_structure(lambda t: tf.gather(t, order), examples)

    return ds.batch(max(1, block)).enumerate().map(permute).unbatch()


def _train_dataset(
    source: _Source,
    config: ml_collections.ConfigDict,
    *,
    image_size: int,
    local_batch_size: int,
    seed: int,
    process_index: int,
    process_count: int,
    start_step: int,
    global_order: bool = False,
) -> tf.data.Dataset:
    """Returns the infinite batched train stream of this process, starting at `start_step`.

    With `global_order`, the stream is this process's rows of the single-process stream
    batched by the global batch size (see the module docstring).
    """
    global_batch_size = local_batch_size * process_count
    # The data shard read and the process identity keyed into the randomness.
    shard_index, shard_count = (0, 1) if global_order else (process_index, process_count)
    stream_batch_size = global_batch_size if global_order else local_batch_size
    start, end = _shard_range(source.split_sizes[config.train_split], shard_index, shard_count)
    num_local = end - start
    if num_local == 0:
        raise ValueError(f"Process {process_index} has no train examples in its shard.")
    num_slices = min(NUM_MERGED_SLICES, num_local)
    slices = []
    for i in range(num_slices):
        a, b = _shard_range(num_local, i, num_slices)
        ds = source.read(config.train_split, start + a, start + b)
        slices.append(ds.cache() if config.cache else ds)

    consumed = start_step * stream_batch_size
    start_epoch, offset = divmod(consumed, num_local)
    process_key = tf.constant([seed, shard_index], tf.int64)

    def epoch(e: tf.Tensor) -> tf.data.Dataset:
        epoch_key = tf.random.experimental.stateless_fold_in(process_key, e)
        merge_key, shuffle_key, aug_key = tf.unstack(
            tf.random.experimental.stateless_split(epoch_key, 3)
        )
        choices = tf.data.Dataset.range(np.iinfo(np.int64).max).map(
            lambda i: tf.random.stateless_uniform(
                [],
                tf.random.experimental.stateless_fold_in(merge_key, i),
                maxval=num_slices,
                dtype=tf.int64,
            )
        )
        merged = tf.data.Dataset.choose_from_datasets(slices, choices, stop_on_empty_dataset=False)
        ds = _block_shuffle(merged, config.shuffle_buffer, shuffle_key)
        # Position within the epoch keys the augmentation, so it survives a restart.
        ds = ds.enumerate().map(lambda i, ex: (aug_key, i, ex))
        return ds.skip(tf.where(e == start_epoch, tf.constant(offset, tf.int64), 0))

    def preprocess(aug_key, i, ex):
        key = tf.random.experimental.stateless_fold_in(aug_key, i)
        image = preprocess_train(
            ex["image"], key, image_size, bool(config.random_crop), bool(config.random_flip)
        )
        return {"image": image, "label": tf.cast(ex["label"], tf.int32)}

    ds = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max).flat_map(epoch)
    if global_order and process_count > 1:
        ds = _keep_rows(ds, global_batch_size, local_batch_size, process_index)
    ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(local_batch_size, drop_remainder=True)
    ds = ds.prefetch(config.prefetch)
    return ds.with_options(_tf_options())


def _eval_dataset(
    source: _Source,
    split: str,
    config: ml_collections.ConfigDict,
    *,
    image_size: int,
    local_batch_size: int,
    process_index: int,
    process_count: int,
    global_order: bool = False,
) -> tuple[tf.data.Dataset, int]:
    """Returns this process's eval batches (with a bool `mask`) and their count.

    Every process yields the same number of full batches, padded with mask=False examples,
    so multi-process evaluation never waits on a process that ran out. With `global_order`,
    the split is padded to whole global batches and each process keeps its rows of each.
    """
    num = source.split_sizes[split]
    global_batch_size = local_batch_size * process_count
    if global_order:
        start, end = 0, num
        num_batches = math.ceil(num / global_batch_size)
        stream_batch_size = global_batch_size
    else:
        start, end = _shard_range(num, process_index, process_count)
        num_batches = math.ceil(math.ceil(num / process_count) / local_batch_size)
        stream_batch_size = local_batch_size

    # Rows stay undecoded until `_keep_rows` has dropped the other processes' rows.
    def preprocess(ex):
        image = tf.cond(
            ex["mask"],
            lambda: preprocess_eval(ex["image"], image_size),
            lambda: tf.zeros([image_size, image_size, 3], tf.float32),
        )
        return {"image": image, "label": tf.cast(ex["label"], tf.int32), "mask": ex["mask"]}

    ds = source.read(split, start, end).map(
        lambda ex: {"image": ex["image"], "label": ex["label"], "mask": tf.constant(True)}
    )
    padding = {
        "image": tf.constant(b""),
        "label": tf.constant(0, tf.int64),
        "mask": tf.constant(False),
    }
    num_padding = num_batches * stream_batch_size - (end - start)
    ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat(num_padding))
    if global_order and process_count > 1:
        ds = _keep_rows(ds, global_batch_size, local_batch_size, process_index)
    ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(local_batch_size, drop_remainder=True).prefetch(config.prefetch)
    return ds.with_options(_tf_options()), num_batches


def create_datasets(
    dataset_config: ml_collections.ConfigDict,
    *,
    image_size: int,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> tuple[Iterator[dict[str, np.ndarray]], Iterable[dict[str, np.ndarray]] | None, PipelineInfo]:
    """Returns (train iterator, eval iterable or None, info) for this process.

    Train yields {"image": float32 [b, H, W, 3] in [0, 1], "label": int32 [b]} forever, with
    b = global_batch_size // process_count, starting at global step `start_step`. Eval is
    re-iterable and adds "mask": bool [b] (False on padding). Reads `dataset_config` fields
    name, data_dir, manual_dir, folder, train_split, eval_split, shuffle_buffer,
    random_crop, random_flip, prefetch, cache and global_order (missing: False). With
    global_order, the processes' batches concatenated in process order are the same for
    every process count (see the module docstring).
    """
    if process_index is None:
        process_index = jax.process_index()
    if process_count is None:
        process_count = jax.process_count()
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count}).")
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of the "
            f"process count {process_count}."
        )
    if image_size <= 0:
        raise ValueError(f"image_size={image_size} must be positive.")
    if start_step < 0:
        raise ValueError(f"start_step={start_step} must be >= 0.")
    local_batch_size = global_batch_size // process_count
    global_order = bool(dataset_config.get("global_order", False))

    source = _open_source(dataset_config)
    train_split = dataset_config.train_split
    if train_split not in source.split_sizes:
        raise ValueError(
            f"train_split={train_split!r} is not a split of {source.name!r}; it has "
            f"{sorted(source.split_sizes)} (plain split names only, no slicing)."
        )
    eval_split = dataset_config.eval_split
    if eval_split is None:
        eval_split = next((s for s in EVAL_SPLIT_CANDIDATES if s in source.split_sizes), None)
    elif eval_split not in source.split_sizes:
        raise ValueError(
            f"eval_split={eval_split!r} is not a split of {source.name!r}; it has "
            f"{sorted(source.split_sizes)}."
        )

    train_ds = _train_dataset(
        source,
        dataset_config,
        image_size=image_size,
        local_batch_size=local_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        start_step=start_step,
        global_order=global_order,
    )
    eval_ds, num_eval_batches = None, 0
    if eval_split is not None:
        eval_tf, num_eval_batches = _eval_dataset(
            source,
            eval_split,
            dataset_config,
            image_size=image_size,
            local_batch_size=local_batch_size,
            process_index=process_index,
            process_count=process_count,
            global_order=global_order,
        )
        eval_ds = tfds.as_numpy(eval_tf)
    num_train = source.split_sizes[train_split]
    info = PipelineInfo(
        name=source.name,
        num_classes=source.num_classes,
        train_split=train_split,
        eval_split=eval_split,
        num_train_examples=num_train,
        num_eval_examples=source.split_sizes[eval_split] if eval_split else 0,
        global_batch_size=global_batch_size,
        local_batch_size=local_batch_size,
        steps_per_epoch=num_train // global_batch_size,
        num_eval_batches=num_eval_batches,
        start_step=start_step,
        global_order=global_order,
    )
    return iter(tfds.as_numpy(train_ds)), eval_ds, info


def make_global_batch(
    local_batch: Mapping[str, Any],
    mesh: Mesh,
    batch_spec: PartitionSpec | None = None,
) -> dict[str, jax.Array]:
    """Assembles each process's local batch into global jax.Arrays sharded over the mesh.

    The leading (batch) axis is split by `batch_spec`; the default shards it over whichever
    of the mesh axes ("data", "fsdp") exist, and replicates it on a mesh with neither.
    """
    if batch_spec is None:
        axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
        batch_spec = PartitionSpec(axes if axes else None)
    sharding = NamedSharding(mesh, batch_spec)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
        dict(local_batch),
    )
