"""Milliseconds to draw one imagenet256 train step's dropout masks: threefry against the hash.

The masks of one step at `--batch`: per layer, two hidden-state masks [B, 257, 768] and one
attention mask [16, 257, 257], over 24 layers, plus the embeddings' (64M draws at batch 4).
`jax.random.bernoulli` (threefry, the flax `nn.Dropout` path) against `models.dropout.keep_mask`;
then the forward pass without and with dropout (`train_speed.time_parts`), whose difference is
what dropout costs the step.

  python benchmarks/dropout_masks.py [--batch 4] [--dtype bfloat16]
"""

import argparse

import jax
import train_speed

from maskgit_jax.models.dropout import keep_mask

LAYERS, LENGTH, WIDTH, HEADS = 24, 257, 768, 16


def _step_mask_elements(batch: int) -> int:
    hidden = batch * LENGTH * WIDTH
    return hidden + LAYERS * (2 * hidden + HEADS * LENGTH * LENGTH)


def main() -> None:
    """Prints the mask-drawing times and the forward pass with and without dropout."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    elements = _step_mask_elements(args.batch)
    shape = (elements // 1024, 1024)
    key = jax.random.PRNGKey(0)
    draws = {
        "jax.random.bernoulli (threefry)": jax.jit(lambda k: jax.random.bernoulli(k, 0.9, shape)),
        "models.dropout.keep_mask (hash)": jax.jit(lambda k: keep_mask(k, shape, 0.1)),
    }
    print(f"device: {jax.devices()[0].device_kind}")
    print(f"one step's dropout masks at batch {args.batch}: {elements / 1e6:.1f}M draws")
    for name, fn in draws.items():
        seconds = train_speed.best_time(lambda fn=fn: fn(key), args.repeats)
        print(f"  {name:34s} {seconds * 1e3:8.1f} ms")
    parts = train_speed.time_parts(args.batch, args.dtype, args.repeats)
    print(f"imagenet256 forward, batch {args.batch}, {args.dtype}:")
    for name, seconds in parts.items():
        print(f"  {name:34s} {seconds:8.3f} s")


if __name__ == "__main__":
    main()
