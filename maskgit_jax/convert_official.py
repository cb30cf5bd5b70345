r"""Converts the authors' released tokenizer + transformer files into a pretrained directory.

  python -m maskgit_jax.convert_official --config=configs/imagenet256.py \
    --tokenizer=tokenizer_imagenet256_checkpoint \
    --transformer=maskgit_imagenet256_checkpoint --output=DIR

Both files are checked name by name and shape by shape against the models built from the
config before anything is written; the output directory must be new or empty. A relative
--output is taken from the current directory; an interrupted conversion leaves only
`<output>.partial`, which the next run removes.
"""

from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from maskgit_jax.checkpoints import official as official_checkpoint
from maskgit_jax.checkpoints import pretrained

_CONFIG = config_flags.DEFINE_config_file("config", None, "Model config file.", lock_config=True)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Released tokenizer file (local or gs://).")
_TRANSFORMER = flags.DEFINE_string(
    "transformer", None, "Released MaskGIT transformer file (local or gs://)."
)
_OUTPUT = flags.DEFINE_string("output", None, "Pretrained directory to write (new or empty).")
flags.mark_flags_as_required(["config", "tokenizer", "transformer", "output"])


def convert(tokenizer_path: str, transformer_path: str, config, output: str) -> epath.Path:
    """Loads and checks both released files, then writes them in this project's format.

    Returns the absolute output directory (`save_pretrained` makes a relative one absolute).
    """
    tokenizer = official_checkpoint.load_official_tokenizer(tokenizer_path, config)
    transformer = official_checkpoint.load_official_transformer(transformer_path, config)
    return pretrained.save_pretrained(output, config, tokenizer, transformer)


def main(argv):
    del argv
    output = convert(_TOKENIZER.value, _TRANSFORMER.value, _CONFIG.value, _OUTPUT.value)
    logging.info("Wrote %s", output)


if __name__ == "__main__":
    app.run(main)
