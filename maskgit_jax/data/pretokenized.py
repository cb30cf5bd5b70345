"""Pre-tokenized datasets: writing token shards once, and a deterministic batch reader.

Layout: `<dir>/shard_<process>.npz` with `tokens` [n, A, h, w] (A augmentations: the
center crop and its horizontal flip) and `labels` [n], `<dir>/info.json`, and in
`<dir>/pretrained/` a copy of the tokenizer that made the tokens (config.json and tokenizer/),
so the directory alone is enough to train the transformer and decode its samples. The reader
orders examples by a permutation of (seed, epoch) over all shards, so global batches do not
depend on the process count and a run restarted at step k sees the batches it would have.
"""

import json
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from maskgit_jax import compile_options, config_lib, paths
from maskgit_jax.checkpoints import pretrained
from maskgit_jax.data import input_pipeline
from maskgit_jax.models import build_tokenizer

INFO_FILE = "info.json"
# The copy of the tokenizer inside a pre-tokenized directory (a pretrained directory).
TOKENIZER_COPY = pretrained.WORKDIR_EXPORT


def write(config: ml_collections.ConfigDict, output: str | epath.PathLike) -> int:
    """Tokenizes this process's share of the train split; returns the examples written.

    Process 0 also copies the tokenizer into `<output>/pretrained` and writes info.json.
    """
    output = paths.absolute(output)
    shard = output / f"shard_{jax.process_index()}.npz"
    if shard.exists():
        raise FileExistsError(f"{shard} exists; choose a new --output directory.")
    source = _checkpoint_tokenizer_dir(config.training.tokenizer_checkpoint)
    loaded = pretrained.load_pretrained(source, config, parts=("tokenizer",))
    tokenizer = build_tokenizer(config)
    encode = jax.jit(
        lambda v, x: tokenizer.apply(v, x, method="encode"),
        compiler_options=compile_options.forward_options(jnp.float32),
    )
    dataset = config.dataset.copy_and_resolve_references()
    dataset.eval_split = dataset.train_split
    per_process = config.training.batch_size
    _, reader, _ = input_pipeline.create_datasets(
        dataset,
        image_size=config.image_size,
        global_batch_size=per_process * jax.process_count(),
        seed=config.seed,
    )
    tokens, labels = [], []
    for batch in reader:
        keep = batch["mask"]
        images = jnp.asarray(batch["image"][keep])
        if not len(images):
            continue
        both = jnp.stack(
            [
                encode(loaded.tokenizer_variables, images),
                encode(loaded.tokenizer_variables, images[:, :, ::-1]),
            ],
            axis=1,
        )
        tokens.append(np.asarray(both))
        labels.append(batch["label"][keep])
    dtype = np.int16 if config.tokenizer.codebook_size <= 2**15 else np.int32
    tokens_array = np.concatenate(tokens).astype(dtype)
    output.mkdir(parents=True, exist_ok=True)
    with shard.open("wb") as f:
        np.savez(f, tokens=tokens_array, labels=np.concatenate(labels).astype(np.int32))
    if jax.process_index() == 0:
        pretrained.copy_pretrained(
            source, output / TOKENIZER_COPY, parts=("tokenizer",), overwrite=True
        )
        info = {
            "num_shards": jax.process_count(),
            "codebook_size": config.tokenizer.codebook_size,
            "tokens_per_side": config_lib.tokens_per_side(config),
            "split": dataset.train_split,
            "tokenizer": TOKENIZER_COPY,
            "tokenizer_source": str(source),
        }
        (output / INFO_FILE).write_text(json.dumps(info, indent=2))
    return len(tokens_array)


def _checkpoint_tokenizer_dir(path: str) -> epath.Path:
    """The pretrained directory of training.tokenizer_checkpoint (or a workdir's export)."""
    if not path:
        raise ValueError(
            "training.tokenizer_checkpoint is empty: pre-tokenizing needs a tokenizer."
        )
    return pretrained.find_pretrained(path, "tokenizer", "training.tokenizer_checkpoint")


def tokenizer_dir(directory: str | epath.PathLike) -> epath.Path:
    """The pretrained directory of the tokenizer that made the tokens in `directory`.

    That is the copy in `<directory>/pretrained`, else the source recorded in info.json
    if it still exists; a FileNotFoundError says to set training.tokenizer_checkpoint.
    """
    directory = paths.absolute(directory)
    candidates = [directory / TOKENIZER_COPY]
    info_path = directory / INFO_FILE
    if info_path.exists():
        recorded = json.loads(info_path.read_text()).get("tokenizer_source")
        if recorded:
            candidates.append(paths.absolute(recorded))
    for candidate in candidates:
        if (candidate / "tokenizer").exists():
            return candidate
    raise FileNotFoundError(
        f"training.pretokenized_dir={directory} holds no tokenizer (looked for "
        f"{', '.join(str(c / 'tokenizer') for c in candidates)}): it was written by an older "
        "version or moved without it. Set training.tokenizer_checkpoint to the tokenizer the "
        "tokens were made with."
    )


def load(directory: str | epath.PathLike) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Reads every shard: tokens [N, A, h, w], labels [N] and the info dict."""
    directory = paths.absolute(directory)
    info_path = directory / INFO_FILE
    if not info_path.exists():
        raise FileNotFoundError(
            f"{info_path} not found: run `python -m maskgit_jax.pretokenize` to write {directory}."
        )
    info = json.loads(info_path.read_text())
    tokens, labels = [], []
    for index in range(info["num_shards"]):
        path = directory / f"shard_{index}.npz"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing ({info['num_shards']} shards expected).")
        with path.open("rb") as f:
            data = np.load(f)
            tokens.append(data["tokens"])
            labels.append(data["labels"])
    return np.concatenate(tokens), np.concatenate(labels), info


def train_batches(
    directory: str,
    start_step: int = 0,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Rows for this process of each global batch {"tokens", "label"}, forever, from `start_step`.

    Epoch e visits (example, augmentation) pairs in the order of a permutation seeded by
    (seed, e); a random augmentation per example and epoch.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise ValueError(
            f"global batch {global_batch_size} is not divisible by {process_count} processes."
        )
    tokens, labels, _ = load(directory)
    local = global_batch_size // process_count
    steps_per_epoch = len(tokens) // global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"{directory} holds {len(tokens)} examples, fewer than one global batch "
            f"({global_batch_size})."
        )
    epoch, offset = divmod(start_step, steps_per_epoch)
    while True:
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(tokens))
        augmentation = rng.integers(0, tokens.shape[1], len(tokens))
        for index in range(offset, steps_per_epoch):
            rows = order[index * global_batch_size : (index + 1) * global_batch_size]
            rows = rows[process_index * local : (process_index + 1) * local]
            yield {"tokens": tokens[rows, augmentation[rows]], "label": labels[rows]}
        epoch, offset = epoch + 1, 0
