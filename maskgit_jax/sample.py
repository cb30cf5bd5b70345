r"""Writes class-conditional samples (or edits of an image) from a pretrained directory.

  python -m maskgit_jax.sample --checkpoint=DIR --labels=1,2,3 --output=OUT
  python -m maskgit_jax.sample --checkpoint=DIR --num_per_class=8 --classes=0,1 --output=OUT
  python -m maskgit_jax.sample --checkpoint=DIR --mode=edit --image=in.png \
    --box=32,32,128,128 --labels=5 --output=OUT

Each image goes to OUT/NNNNN_class<label>.png and all of them to OUT/grid.png. Editing modes
(inpaint with --mask=PNG, outpaint with --extend=l,r,t,b, edit with --box=x0,y0,x1,y1) apply
to one --image, once per label.
"""

import math
from collections.abc import Iterable, Sequence

import jax
import numpy as np
from absl import app, flags, logging

from maskgit_jax import paths, validation
from maskgit_jax.data import images_io
from maskgit_jax.decoding.options import DTYPES, ORDERINGS
from maskgit_jax.sampling import editing, pipeline

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Pretrained directory (local or gs://).")
_OUTPUT = flags.DEFINE_string("output", None, "Directory for the PNG files and grid.png.")
_LABELS = flags.DEFINE_list("labels", None, "Class ids, one image each (e.g. 1,2,3).")
_CLASSES = flags.DEFINE_list("classes", None, "With --num_per_class: the classes (default all).")
_NUM_PER_CLASS = flags.DEFINE_integer("num_per_class", None, "Images per class.")
_NUM_STEPS = flags.DEFINE_integer(
    "num_steps", None, "Decoding steps (default: the config's; 12 when editing)."
)
_START_STEP = flags.DEFINE_integer(
    "start_step", None, f"First decoding step (default 0; {editing.EDIT_START_STEP} when editing)."
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Images per decoding batch.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_SCHEDULE = flags.DEFINE_string("schedule", None, "Mask schedule (default: the config's).")
_CHOICE_TEMPERATURE = flags.DEFINE_float("choice_temperature", None, "Re-masking temperature.")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "Softmax temperature of sampling.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Sample among the k most likely codes.")
_GUIDANCE = flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance scale.")
_FORCE_GUIDANCE = flags.DEFINE_bool(
    "force_guidance", False, "Guide although the config reports no label dropout."
)
_ORDERING = flags.DEFINE_enum("ordering", None, ORDERINGS, "Reveal order (default: config's).")
_DTYPE = flags.DEFINE_enum("dtype", None, DTYPES, "Transformer compute dtype (default: config's).")
_MODE = flags.DEFINE_enum(
    "mode", "generate", ["generate", "inpaint", "outpaint", "edit"], "What to do."
)
_IMAGE = flags.DEFINE_string("image", None, "Input image for the editing modes.")
_MASK = flags.DEFINE_string("mask", None, "inpaint: mask image, bright = regenerate.")
_BOX = flags.DEFINE_list("box", None, "edit: pixel box x0,y0,x1,y1 (x1, y1 exclusive).")
_EXTEND = flags.DEFINE_list("extend", None, "outpaint: pixels to add left,right,top,bottom.")

flags.mark_flags_as_required(["checkpoint", "output"])


def _ints(values: Sequence[str], name: str) -> list[int]:
    try:
        return [int(v) for v in values]
    except ValueError as error:
        raise app.UsageError(f"--{name} must be comma-separated integers: {error}") from error


def requested_labels(
    labels: Sequence[str] | None,
    num_per_class: int | None,
    classes: Sequence[str] | None,
    num_classes: int,
) -> tuple[np.ndarray, int]:
    """The labels to sample and the grid's row count (one row per class with num_per_class)."""
    if (labels is None) == (num_per_class is None):
        raise app.UsageError("Give exactly one of --labels and --num_per_class.")
    if labels is not None:
        if classes is not None:
            raise app.UsageError("--classes only goes with --num_per_class.")
        result = np.asarray(_ints(labels, "labels"), np.int32)
        return result, _grid_rows(len(result))
    if num_per_class < 1:
        raise app.UsageError("--num_per_class must be >= 1.")
    chosen = _ints(classes, "classes") if classes is not None else list(range(num_classes))
    return np.repeat(np.asarray(chosen, np.int32), num_per_class), len(chosen)


def _grid_rows(count: int) -> int:
    """The largest divisor of `count` not above its square root (a near-square grid)."""
    return max(d for d in range(1, math.isqrt(count) + 1) if count % d == 0)


def _progress(batches: Sequence, description: str) -> Iterable:
    """Iterates with a tqdm bar when tqdm is installed, else logs a line per batch."""
    try:
        from tqdm import tqdm
    except ImportError:

        def logged():
            for i, batch in enumerate(batches):
                logging.info("%s: batch %d/%d", description, i + 1, len(batches))
                yield batch

        return logged()
    return tqdm(batches, desc=description, unit="batch")


def _decode_options(pipe: pipeline.MaskGITPipeline, editing_mode: bool):
    """The flags' decoding options, checked now: before any file or folder is written."""
    steps, start = _NUM_STEPS.value, _START_STEP.value
    if editing_mode:
        steps = editing.EDIT_NUM_STEPS if steps is None else steps
        start = editing.EDIT_START_STEP if start is None else start
    try:
        return pipe.options(
            num_steps=steps,
            start_step=start,
            schedule=_SCHEDULE.value,
            choice_temperature=_CHOICE_TEMPERATURE.value,
            temperature=_TEMPERATURE.value,
            top_k=_TOP_K.value,
            guidance_scale=_GUIDANCE.value,
            ordering=_ORDERING.value,
            dtype=_DTYPE.value,
            force_guidance=_FORCE_GUIDANCE.value,
        )
    except ValueError as error:
        raise app.UsageError(f"bad decoding option: {error}") from error


def _edit_request(image_size: tuple[int, int]) -> dict:
    """The editing flags of --mode, checked and read (the mask image, box or extents)."""
    mode = _MODE.value
    if mode == "inpaint":
        if not _MASK.value:
            raise app.UsageError("--mode=inpaint needs --mask=PNG.")
        mask = images_io.read_image(_MASK.value).mean(axis=-1) > 0.5
        if mask.shape != image_size:
            raise app.UsageError(
                f"--mask is {mask.shape[0]}x{mask.shape[1]} but --image is "
                f"{image_size[0]}x{image_size[1]}."
            )
        return {"mask": mask}
    if mode == "edit":
        if not _BOX.value or len(_BOX.value) != 4:
            raise app.UsageError("--mode=edit needs --box=x0,y0,x1,y1.")
        try:
            return {"box": [float(v) for v in _BOX.value]}
        except ValueError as error:
            raise app.UsageError(f"--box must be four numbers: {error}") from error
    if not _EXTEND.value or len(_EXTEND.value) != 4:
        raise app.UsageError("--mode=outpaint needs --extend=left,right,top,bottom.")
    return {"extend": _ints(_EXTEND.value, "extend")}


def _edit_batch(
    pipe: pipeline.MaskGITPipeline, image: np.ndarray, labels, rng, options, request, start: int
):
    """One batch of edits of `image`, one per label, in the mode --mode names."""
    batch = np.broadcast_to(image, (len(labels),) + image.shape)
    common = dict(options=options, row_offset=start)
    if "mask" in request:
        return pipe.inpaint(batch, request["mask"], labels, rng, **common)
    if "box" in request:
        return pipe.edit(batch, request["box"], labels, rng, **common)
    left, right, top, bottom = request["extend"]
    return pipe.outpaint(batch, left, right, top, bottom, label=labels, rng=rng, **common)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _BATCH_SIZE.value < 1:
        raise app.UsageError("--batch_size must be >= 1.")
    pipe = pipeline.MaskGITPipeline.from_pretrained(
        paths.absolute(_CHECKPOINT.value), max_batch_size=_BATCH_SIZE.value
    )
    labels, rows = requested_labels(
        _LABELS.value, _NUM_PER_CLASS.value, _CLASSES.value, pipe.config.num_classes
    )
    try:
        validation.check_labels(labels, pipe.config.num_classes)
    except ValueError as error:
        raise app.UsageError(str(error)) from error
    editing_mode = _MODE.value != "generate"
    options = _decode_options(pipe, editing_mode)
    image = request = None
    if editing_mode:
        if not _IMAGE.value:
            raise app.UsageError(f"--mode={_MODE.value} needs --image=PATH.")
        image = images_io.read_image(_IMAGE.value)
        request = _edit_request(image.shape[:2])

    # Everything is checked: only now is --output created.
    output = paths.absolute(_OUTPUT.value)
    output.mkdir(parents=True, exist_ok=True)
    rng = jax.random.PRNGKey(_SEED.value)
    size = _BATCH_SIZE.value
    batches = [labels[i : i + size] for i in range(0, len(labels), size)]
    results = []
    for index, batch in enumerate(_progress(batches, _MODE.value)):
        start = index * size
        if image is None:
            # One key for the whole run, rows numbered globally: the same images whatever
            # --batch_size is, and the same as `pipe.generate(labels, rng)` in a notebook.
            images = pipe.generate(batch, rng, options, row_offset=start)
        else:
            images = _edit_batch(pipe, image, batch, rng, options, request, start)
        for offset, (picture, label) in enumerate(zip(images, batch, strict=True)):
            images_io.write_png(picture, output / f"{start + offset:05d}_class{label}.png")
        results.append(images)
    grid = images_io.make_grid(np.concatenate(results), rows)
    images_io.write_png(grid, output / "grid.png")
    logging.info("Wrote %d images and grid.png to %s", len(labels), output)


if __name__ == "__main__":
    app.run(main)
