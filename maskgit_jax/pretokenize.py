r"""Pre-tokenizes a dataset once with a frozen tokenizer, so training skips the encoder.

  python -m maskgit_jax.pretokenize --config=configs/imagenet256.py \
    --config.training.tokenizer_checkpoint=DIR --output=TOKENS_DIR

Each image is center-cropped and stored with its horizontal flip (two augmentations), as
int16/int32 token grids; every process writes the shard of the split it read. A copy of the
tokenizer goes to TOKENS_DIR/pretrained, so `--config.training.pretokenized_dir=TOKENS_DIR`
alone is enough to train the transformer.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from maskgit_jax import paths
from maskgit_jax.data import pretokenized

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_OUTPUT = flags.DEFINE_string("output", None, "Directory to write the token shards to.")
flags.mark_flags_as_required(["config", "output"])


def main(argv):
    del argv
    output = paths.absolute(_OUTPUT.value)
    count = pretokenized.write(_CONFIG.value, output)
    logging.info("Wrote %d examples to %s", count, output)


if __name__ == "__main__":
    app.run(main)
