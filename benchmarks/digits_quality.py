"""Quality of the digits default: accuracy, Fréchet distance, diversity and near-copies.

Scores, against the 297 held-out digits (see `maskgit_jax.evaluation.digits_quality`):
the training digits (the Fréchet baseline), the tokenizer's reconstructions of the training
and of the held-out digits, and samples with the training split's label counts (1500 images,
so their Fréchet distance carries the same sample-size bias as the baseline's).

  # One trained model, at its config's sampling options:
  python benchmarks/digits_quality.py --pretrained=/tmp/maskgit_digits/transformer/pretrained
  # ... and over the sampling options (steps, temperatures, ordering, guidance):
  python benchmarks/digits_quality.py --pretrained=DIR --sweep=sampling
  # Train variants of configs/digits.py (one `python -m maskgit_jax.main` each, about as long
  # as the README's main command) and score each at its own sampling options:
  python benchmarks/digits_quality.py --sweep=training --out=/tmp/digits_sweep \
      [--variants=default,no_label_smoothing]

Variants that only change the transformer reuse the `default` variant's tokenizer.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from maskgit_jax.evaluation import digits_quality
from maskgit_jax.sampling.pipeline import MaskGITPipeline

REPO = Path(__file__).resolve().parent.parent

# One option changed at a time from the config's sampling defaults. Choice temperatures only
# act in the confidence order, so those rows set it.
SAMPLING_VARIANTS = {
    "config defaults": {},
    "steps 8": {"num_steps": 8},
    "steps 12": {"num_steps": 12},
    "steps 16": {"num_steps": 16},
    "temperature 0.8": {"temperature": 0.8},
    "temperature 1.2": {"temperature": 1.2},
    "halton order": {"ordering": "halton"},
    "confidence order, choice temperature 0": {"ordering": "confidence", "choice_temperature": 0.0},
    "confidence order, choice temperature 4.5": {
        "ordering": "confidence",
        "choice_temperature": 4.5,
    },
    "confidence order, choice temperature 20": {
        "ordering": "confidence",
        "choice_temperature": 20.0,
    },
    "one token a step, random order": {
        "num_steps": None,  # Filled with the token count: exact ancestral sampling.
        "schedule": "linear",
        "ordering": "confidence",
        "choice_temperature": 1000.0,
    },
    "guidance 0.5": {"guidance_scale": 0.5, "force_guidance": True},
    "guidance 2": {"guidance_scale": 2.0, "force_guidance": True},
}

# Transformer-only variants reuse the default's tokenizer; the others retrain both stages.
TOKENIZER_OVERRIDES = ("tokenizer.", "tokenizer_training.", "image_size")
TRAINING_VARIANTS = {
    "default": [],
    "half the steps": ["--config.training.num_train_steps=3000"],
    "batch 64 for half the steps": [
        "--config.training.batch_size=64",
        "--config.training.num_train_steps=3000",
    ],
    "batch 64 for 2000 steps": [
        "--config.training.batch_size=64",
        "--config.training.num_train_steps=2000",
    ],
    "no label smoothing": ["--config.training.label_smoothing=0.0"],
    "dropout 0.1": [
        "--config.transformer.dropout_rate=0.1",
        "--config.transformer.attention_dropout_rate=0.1",
    ],
    "linear masking": ["--config.training.mask_schedule=linear"],
    "no EMA": ["--config.training.ema_decay=0.0"],
    "label dropout 0.1": ["--config.training.label_dropout=0.1"],
    "16px in 4x4 tokens": [
        "--config.image_size=16",
        "--config.tokenizer.channel_multipliers=(1, 2, 2)",
    ],
    "codebook 32": ["--config.tokenizer.codebook_size=32"],
    "codebook 256": ["--config.tokenizer.codebook_size=256"],
}
# Sampling options scored for a variant besides its config's (guidance needs label dropout).
VARIANT_SAMPLING = {
    "label dropout 0.1": {
        "guidance 0.5": {"guidance_scale": 0.5},
        "guidance 2": {"guidance_scale": 2.0},
    },
}


def reference_rows(pipe: MaskGITPipeline, reference: digits_quality.DigitsReference):
    """The real digits, the tokenizer's reconstructions of both splits, and a diagnostic.

    The diagnostic decodes training token grids whose every position is taken from another
    digit of the same class: right per-position statistics, no agreement between positions,
    which shows how the decoder renders inconsistent grids.
    """
    real, train = reference.real_rows()
    tokens, labels = pipe.encode(reference.train_images), reference.train_labels
    held_out = pipe.decode_tokens(pipe.encode(reference.test_images))
    rows = [
        real,
        train,
        reference.score("reconstructions of training digits", pipe.decode_tokens(tokens), labels),
        reference.score("reconstructions of held-out digits", held_out, reference.test_labels),
    ]
    mixed = tokens.reshape(len(tokens), -1).copy()
    rng = np.random.default_rng(0)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        for position in range(mixed.shape[1]):
            mixed[members, position] = mixed[rng.permutation(members), position]
    rows.append(
        reference.score(
            "training tokens mixed per position within a class",
            pipe.decode_tokens(mixed.reshape(tokens.shape)),
            labels,
        )
    )
    return real, train, rows


def sample_row(pipe, reference, name: str, seed: int, **options) -> digits_quality.QualityRow:
    """Samples with the training split's labels at `options` and scores them."""
    if "num_steps" in options and options["num_steps"] is None:
        options["num_steps"] = pipe.grid_side**2
    images = pipe.generate(reference.train_labels, jax.random.PRNGKey(seed), **options)
    return reference.score(name, images, reference.train_labels)


def score_model(pretrained: str, sampling: dict[str, dict], seed: int) -> str:
    """The table of one trained model: real, reconstructions, samples at each of `sampling`."""
    pipe = MaskGITPipeline.from_pretrained(pretrained)
    reference = digits_quality.DigitsReference(pipe.config.image_size)
    real, train, rows = reference_rows(pipe, reference)
    for name, options in sampling.items():
        rows.append(sample_row(pipe, reference, f"samples, {name}", seed, **dict(options)))
    sampling = pipe.config.sampling
    header = (
        f"{pretrained}: image {pipe.config.image_size}px, {pipe.grid_side}x{pipe.grid_side} "
        f"tokens, {pipe.codebook_size} codes; config sampling: T={sampling.num_steps}, "
        f"choice temperature {sampling.choice_temperature}, temperature {sampling.temperature}, "
        f"{sampling.get('ordering', 'confidence')} order"
    )
    return header + "\n" + digits_quality.format_table(rows, real, train)


def train_variant(out: Path, name: str, overrides: list[str], default_dir: Path) -> Path:
    """Runs `python -m maskgit_jax.main` for one variant; returns its transformer pretrained."""
    workdir = out / name.replace(" ", "_")
    retrains_tokenizer = name == "default" or any(
        flag.removeprefix("--config.").startswith(TOKENIZER_OVERRIDES) for flag in overrides
    )
    # A stage=both run keeps each stage in its own subdirectory.
    pretrained = workdir / ("transformer" if retrains_tokenizer else "") / "pretrained"
    if pretrained.exists():
        print(f"[{name}] already trained in {workdir}", flush=True)
        return pretrained
    command = [
        sys.executable,
        "-m",
        "maskgit_jax.main",
        f"--config={REPO / 'configs' / 'digits.py'}",
        f"--workdir={workdir}",
        *overrides,
    ]
    if not retrains_tokenizer:
        command += [
            "--config.stage=transformer",
            f"--config.training.tokenizer_checkpoint={default_dir / 'tokenizer'}",
        ]
    start = time.perf_counter()
    log = out / f"{workdir.name}.log"
    out.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as stream:
        subprocess.run(command, check=True, stdout=stream, stderr=subprocess.STDOUT, cwd=REPO)
    print(f"[{name}] trained in {time.perf_counter() - start:.0f} s (log {log})", flush=True)
    return pretrained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pretrained", help="a transformer pretrained directory to score")
    parser.add_argument("--sweep", choices=("none", "sampling", "training"), default="none")
    parser.add_argument("--out", help="where --sweep=training writes one workdir per variant")
    parser.add_argument(
        "--variants",
        default=",".join(TRAINING_VARIANTS),
        help=f"comma-separated training variants, of: {', '.join(TRAINING_VARIANTS)}",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.sweep == "training":
        if not args.out:
            parser.error("--sweep=training needs --out=DIR.")
        names = [name.strip() for name in args.variants.split(",") if name.strip()]
        unknown = [name for name in names if name not in TRAINING_VARIANTS]
        if unknown:
            parser.error(f"unknown variants {unknown}; choose from {list(TRAINING_VARIANTS)}.")
        out = Path(os.path.abspath(args.out))
        default_dir = out / "default"
        for name in ["default"] + [name for name in names if name != "default"]:
            pretrained = train_variant(out, name, TRAINING_VARIANTS[name], default_dir)
            if name in names:
                print(f"\n## {name}: {' '.join(TRAINING_VARIANTS[name]) or 'configs/digits.py'}")
                sampling = {"config defaults": {}, **VARIANT_SAMPLING.get(name, {})}
                print(score_model(str(pretrained), sampling, args.seed), flush=True)
        return
    if not args.pretrained:
        parser.error("--pretrained=DIR is needed unless --sweep=training.")
    sampling = SAMPLING_VARIANTS if args.sweep == "sampling" else {"config defaults": {}}
    print(score_model(args.pretrained, sampling, args.seed))


if __name__ == "__main__":
    main()
