"""Tests of the input pipeline and the digits builder; offline, CPU, data under tmp_path."""

import os

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from jax.sharding import Mesh, PartitionSpec

from maskgit_jax import config_lib
from maskgit_jax.data import input_pipeline as ip
from maskgit_jax.data.datasets import digits


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    """Prepares the digits dataset once for the module."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    tfds.builder("digits", data_dir=data_dir).download_and_prepare()
    return data_dir


def _digits_config(data_dir):
    config = config_lib.dataset_config()
    config.name = "digits"
    config.data_dir = data_dir
    return config


def _fake_source(num_examples):
    """A source whose labels are the example indices, to follow each example's path.

    Images are 6 x 9 gradients offset by the index, so crops and flips change the pixels.
    """
    gradient = tf.constant(np.arange(54).reshape(6, 9, 1) * 4, tf.int64)

    def png(i):
        return tf.io.encode_png(tf.cast((gradient + 17 * i) % 256, tf.uint8))

    def read(split, start, end):
        del split
        labels = tf.data.Dataset.range(start, end)
        return labels.map(lambda i: {"image": png(i), "label": i})

    return ip._Source("fake", num_examples, {"train": num_examples}, read)


def _fake_stream(
    num_examples,
    *,
    seed,
    process_index=0,
    process_count=1,
    start_step=0,
    local_batch_size=1,
    global_order=False,
):
    """Returns the label (= example index) order of a fake source's train stream."""
    config = config_lib.dataset_config()
    config.shuffle_buffer = 16
    ds = ip._train_dataset(
        _fake_source(num_examples),
        config,
        image_size=4,
        local_batch_size=local_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        start_step=start_step,
        global_order=global_order,
    )
    return ds


def _labels(ds, n):
    return [int(b["label"][0]) for b in tfds.as_numpy(ds.take(n))]


def test_digits_builder(digits_dir):
    builder = tfds.builder("digits", data_dir=digits_dir)
    assert builder.info.splits["train"].num_examples == 1797 - digits.NUM_TEST
    assert builder.info.splits["test"].num_examples == digits.NUM_TEST
    images, labels = [], []
    for ex in tfds.as_numpy(builder.as_dataset(split="train")):
        images.append(ex["image"])
        labels.append(ex["label"])
    images = np.stack(images)
    assert images.shape == (1500, 32, 32, 3) and images.dtype == np.uint8
    assert images.min() == 0 and images.max() == 255
    assert set(labels) == set(range(10))


def test_train_and_eval_batches(digits_dir):
    train, evals, info = ip.create_datasets(
        _digits_config(digits_dir),
        image_size=16,
        global_batch_size=50,
        seed=0,
        process_index=0,
        process_count=2,
    )
    assert info.num_classes == 10 and info.local_batch_size == 25
    assert info.eval_split == "test" and info.steps_per_epoch == 1500 // 50
    batch = next(train)
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (25, 16, 16, 3) and batch["image"].dtype == np.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["label"].shape == (25,) and batch["label"].dtype == np.int32
    # Eval pads to the same batch count on every process; masks count the real examples.
    eval_batches = list(evals)
    assert len(eval_batches) == info.num_eval_batches == 6
    assert sum(int(b["mask"].sum()) for b in eval_batches) == 297 // 2
    assert all(b["image"].shape == (25, 16, 16, 3) for b in eval_batches)
    assert len(list(evals)) == 6  # Re-iterable.


def test_shards_disjoint_and_cover_one_epoch():
    n = 101
    epochs = []
    for process_index in range(2):
        start, end = ip._shard_range(n, process_index, 2)
        order = _labels(
            _fake_stream(n, seed=3, process_index=process_index, process_count=2), end - start
        )
        assert sorted(order) == list(range(start, end))  # One epoch = a permutation.
        epochs.append(set(order))
    assert not epochs[0] & epochs[1]
    assert epochs[0] | epochs[1] == set(range(n))


def test_order_depends_only_on_seed():
    first = _labels(_fake_stream(60, seed=1), 120)
    assert first == _labels(_fake_stream(60, seed=1), 120)
    assert first != _labels(_fake_stream(60, seed=2), 120)
    assert first[:60] != first[60:]  # Each epoch is shuffled anew.


def test_order_ignores_a_global_tf_seed():
    # Another library setting TF's global seed (keras.utils.set_random_seed does) must neither
    # break the pipeline nor change its order.
    expected = _labels(_fake_stream(60, seed=1), 90)
    tf.random.set_seed(1234)
    try:
        assert _labels(_fake_stream(60, seed=1), 90) == expected
    finally:
        tf.random.set_seed(None)
    assert sorted(expected[:60]) == list(range(60))  # An epoch is a permutation.


@pytest.mark.parametrize("start_step", [7, 95])
def test_restart_matches_continuation_fake(start_step):
    full = _labels(_fake_stream(40, seed=5), start_step + 10)
    resumed = _labels(_fake_stream(40, seed=5, start_step=start_step), 10)
    assert resumed == full[start_step:]


def test_restart_matches_continuation_digits(digits_dir):
    config = _digits_config(digits_dir)
    kwargs = dict(image_size=16, global_batch_size=100, seed=4, process_index=1, process_count=2)
    train, _, _ = ip.create_datasets(config, **kwargs)
    full = [next(train) for _ in range(19)]
    # 15 steps of 50 local examples is one epoch of the 750-example shard: 17 crosses it.
    resumed, _, info = ip.create_datasets(config, start_step=17, **kwargs)
    assert info.start_step == 17
    for step in (17, 18):
        batch = next(resumed)
        np.testing.assert_array_equal(batch["label"], full[step]["label"])
        np.testing.assert_array_equal(batch["image"], full[step]["image"])


def _write_image(path, array):
    encode = tf.io.encode_jpeg if path.endswith(".jpg") else tf.io.encode_png
    tf.io.write_file(path, encode(tf.constant(array, tf.uint8)))


def _folder_dataset(root):
    """Class "gray" holds grayscale images of value 100, class "red" pure red RGB ones."""
    for split, count in (("train", 3), ("validation", 2)):
        for cls in ("gray", "red"):
            os.makedirs(root / split / cls)
        for i in range(count):
            h, w = 20 + 7 * i, 30 - 3 * i
            _write_image(str(root / split / "gray" / f"{i}.png"), np.full([h, w, 1], 100))
            red = np.zeros([w, h, 3])
            red[..., 0] = 255
            _write_image(str(root / split / "red" / f"{i}.png"), red)
    _write_image(
        str(root / "train" / "red" / "extra.jpg"),
        np.stack([np.full([17, 9], 255), np.zeros([17, 9]), np.zeros([17, 9])], -1),
    )


def test_folder_source(tmp_path):
    _folder_dataset(tmp_path)
    config = config_lib.dataset_config()
    config.name, config.folder, config.random_crop = "folder", str(tmp_path), True
    train, evals, info = ip.create_datasets(config, image_size=8, global_batch_size=7, seed=0)
    assert (info.num_classes, info.num_train_examples, info.eval_split) == (2, 7, "validation")
    batch = next(train)
    assert batch["image"].shape == (7, 8, 8, 3) and batch["image"].dtype == np.float32
    assert sorted(batch["label"].tolist()) == [0, 0, 0, 1, 1, 1, 1]
    gray = np.full(3, 100 / 255)
    red = np.array([1.0, 0.0, 0.0])
    for image, label in zip(batch["image"], batch["label"], strict=True):
        np.testing.assert_allclose(
            image, np.broadcast_to(red if label else gray, image.shape), atol=0.02
        )
    eval_batch = next(iter(evals))
    assert eval_batch["image"].shape == (7, 8, 8, 3)
    assert int(eval_batch["mask"].sum()) == 4


def test_folder_errors(tmp_path):
    config = config_lib.dataset_config()
    config.name = "folder"
    config.folder = str(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="absent"):
        ip.create_datasets(config, image_size=8, global_batch_size=2, seed=0)
    config.folder = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="train"):
        ip.create_datasets(config, image_size=8, global_batch_size=2, seed=0)
    os.makedirs(tmp_path / "train" / "cls")
    (tmp_path / "train" / "cls" / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match="no class subfolders"):
        ip.create_datasets(config, image_size=8, global_batch_size=2, seed=0)


def test_imagenet_missing_tars(tmp_path):
    config = config_lib.dataset_config()
    config.data_dir = str(tmp_path)
    manual = os.path.join(str(tmp_path), "downloads", "manual")
    with pytest.raises(FileNotFoundError) as error:
        ip.create_datasets(config, image_size=16, global_batch_size=2, seed=0)
    message = str(error.value)
    assert ip.IMAGENET_TRAIN_TAR in message and ip.IMAGENET_VAL_TAR in message
    assert manual in message
    # With a manual_dir holding one tar, only the other is named.
    config.manual_dir = str(tmp_path / "mine")
    os.makedirs(config.manual_dir)
    (tmp_path / "mine" / ip.IMAGENET_TRAIN_TAR).write_bytes(b"")
    with pytest.raises(FileNotFoundError) as error:
        ip.create_datasets(config, image_size=16, global_batch_size=2, seed=0)
    message = str(error.value)
    assert ip.IMAGENET_TRAIN_TAR not in message and ip.IMAGENET_VAL_TAR in message
    assert config.manual_dir in message


def test_unknown_and_unprepared_names(tmp_path):
    config = config_lib.dataset_config()
    config.data_dir = str(tmp_path)
    config.name = "no_such_dataset_xyz"
    with pytest.raises(ValueError, match="no_such_dataset_xyz.*digits"):
        ip.create_datasets(config, image_size=16, global_batch_size=2, seed=0)
    config.name = "mnist"  # Registered but not prepared: an error, never a download.
    with pytest.raises(FileNotFoundError, match="not prepared"):
        ip.create_datasets(config, image_size=16, global_batch_size=2, seed=0)


def test_batch_not_divisible_by_process_count(digits_dir):
    with pytest.raises(ValueError, match="multiple of the process count 4"):
        ip.create_datasets(
            _digits_config(digits_dir),
            image_size=16,
            global_batch_size=6,
            seed=0,
            process_index=0,
            process_count=4,
        )


def test_make_global_batch_one_device():
    local = {"image": np.ones([4, 8, 8, 3], np.float32), "label": np.arange(4, dtype=np.int32)}
    devices = np.array(jax.devices()[:1])
    for mesh in (Mesh(devices.reshape(1, 1), ("data", "fsdp")), Mesh(devices, ("data",))):
        batch = ip.make_global_batch(local, mesh)
        assert isinstance(batch["image"], jax.Array)
        assert batch["image"].shape == (4, 8, 8, 3) and batch["label"].shape == (4,)
        np.testing.assert_array_equal(np.asarray(batch["label"]), local["label"])
    explicit = ip.make_global_batch(local, mesh, PartitionSpec("data"))
    assert explicit["image"].sharding.spec == PartitionSpec("data")


def _concat(batches):
    """Concatenates a list of batches (dicts of arrays) along the batch axis."""
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _global_batches(num_examples, global_batch, process_count, steps, **kwargs):
    """Returns `steps` fake global batches assembled from every process, stacked."""
    local = global_batch // process_count
    per_process = [
        list(
            tfds.as_numpy(
                _fake_stream(
                    num_examples,
                    process_index=p,
                    process_count=process_count,
                    local_batch_size=local,
                    **kwargs,
                ).take(steps)
            )
        )
        for p in range(process_count)
    ]
    batches = [_concat(b) for b in zip(*per_process, strict=True)]
    return {k: np.stack([b[k] for b in batches]) for k in ("image", "label")}


def _assert_batches_equal(got, want):
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_global_order_fake_is_independent_of_process_count():
    # 45 examples and batches of 12: epochs end mid-batch; 8 steps cover 2.1 epochs.
    kwargs = dict(seed=6, global_order=True)
    single = _global_batches(45, 12, 1, 8, **kwargs)
    assert single["label"].shape == (8, 12) and single["image"].shape == (8, 12, 4, 4, 3)
    for epoch in range(2):  # Each epoch is still a permutation of the whole split.
        assert sorted(single["label"].ravel()[45 * epoch : 45 * (epoch + 1)]) == list(range(45))
    # Crops and flips vary: the same example looks different in different epochs.
    first, second = (np.argsort(single["label"].ravel()[45 * e : 45 * (e + 1)]) for e in (0, 1))
    images = single["image"].reshape(-1, 4, 4, 3)
    assert not np.array_equal(images[first], images[45 + second])
    _assert_batches_equal(_global_batches(45, 12, 2, 8, **kwargs), single)
    _assert_batches_equal(_global_batches(45, 12, 4, 8, **kwargs), single)
    # On one process the flag changes nothing; per-process shards do depend on the count.
    _assert_batches_equal(_global_batches(45, 12, 1, 8, seed=6), single)
    assert not np.array_equal(_global_batches(45, 12, 2, 8, seed=6)["label"], single["label"])


def test_global_order_restart_fake():
    start_step = 8  # 96 examples in: epoch 2, offset 6.
    kwargs = dict(seed=2, process_count=2, global_order=True)
    full = _global_batches(45, 12, steps=start_step + 4, **kwargs)
    resumed = _global_batches(45, 12, steps=4, start_step=start_step, **kwargs)
    _assert_batches_equal(resumed, {k: v[start_step:] for k, v in full.items()})


def _digits_global_batches(data_dir, process_count, global_batch, steps):
    """Returns `steps` train batches and all eval batches concatenated over the processes."""
    config = _digits_config(data_dir)
    config.global_order = True
    trains, evals = [], []
    for p in range(process_count):
        train, eval_ds, info = ip.create_datasets(
            config,
            image_size=8,
            global_batch_size=global_batch,
            seed=3,
            process_index=p,
            process_count=process_count,
        )
        assert info.global_order and info.local_batch_size == global_batch // process_count
        trains.append([next(train) for _ in range(steps)])
        evals.append(list(eval_ds))
    return [_concat(b) for b in zip(*trains, strict=True)], [
        _concat(b) for b in zip(*evals, strict=True)
    ]


def test_global_order_digits_is_independent_of_process_count(digits_dir):
    train_1, eval_1 = _digits_global_batches(digits_dir, 1, 40, 3)
    assert len(eval_1) == 8  # ceil(297 / 40) global batches, padded with mask=False.
    assert sum(int(b["mask"].sum()) for b in eval_1) == 297
    train_2, eval_2 = _digits_global_batches(digits_dir, 2, 40, 3)
    assert len(eval_2) == 8
    for got, want in zip(train_2 + eval_2, train_1 + eval_1, strict=True):
        _assert_batches_equal(got, want)


def test_global_order_restart_digits(digits_dir):
    config = _digits_config(digits_dir)
    config.global_order = True
    kwargs = dict(image_size=8, global_batch_size=200, seed=4, process_index=1, process_count=2)
    train, _, _ = ip.create_datasets(config, **kwargs)
    full = [next(train) for _ in range(10)]
    # 1500 = 7.5 global batches: epoch 1 starts inside step 7; step 8 resumes mid-epoch.
    resumed, _, info = ip.create_datasets(config, start_step=8, **kwargs)
    assert info.start_step == 8 and info.local_batch_size == 100
    for step in (8, 9):
        batch = next(resumed)
        np.testing.assert_array_equal(batch["label"], full[step]["label"])
        np.testing.assert_array_equal(batch["image"], full[step]["image"])
