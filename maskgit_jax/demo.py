r"""A local web page for trying a pretrained model: generate, inpaint, outpaint and edit.

  python -m maskgit_jax.demo --checkpoint=/tmp/maskgit_digits/transformer/pretrained

Serves a Gradio page (http://127.0.0.1:7860 by default) over one `MaskGITPipeline`; every
request goes through the pipeline's own checks, and a bad input is shown on the page as a
message. Needs the `demo` extra: `pip install -e ".[demo]"`.
"""

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from absl import app, flags

try:
    import gradio as gr
except ImportError as error:  # pragma: no cover - depends on the install
    raise SystemExit(f'maskgit_jax.demo needs Gradio: pip install -e ".[demo]" ({error})') from None
from PIL import Image

from maskgit_jax import paths, validation
from maskgit_jax.data import images_io
from maskgit_jax.decoding import mask_schedule
from maskgit_jax.decoding.options import DTYPES, ORDERINGS
from maskgit_jax.sampling import editing
from maskgit_jax.sampling.pipeline import MaskGITPipeline

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Pretrained directory (local or gs://).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to serve on (0.0.0.0: every one).")
_PORT = flags.DEFINE_integer("port", 7860, "Port to serve on.")
_MAX_IMAGES = flags.DEFINE_integer("max_images", 64, "Most images one generate request makes.")
_MAX_SIDE = flags.DEFINE_integer(
    "max_side", None, "Largest image side accepted or produced (default: 8x the model's size)."
)
flags.mark_flag_as_required("checkpoint")

# Modes whose pixels convert to RGB without loss of meaning (alpha is checked separately).
_ACCEPTED_MODES = ("RGB", "RGBA", "L", "LA", "P", "PA", "1")
# Small images are drawn enlarged with hard pixel edges, not blurred.
_CSS = ".maskgit-pixels img { image-rendering: pixelated; }"


@contextlib.contextmanager
def _shown_on_page() -> Iterator[None]:
    """Turns the pipeline's input errors into a message on the page."""
    try:
        yield
    except (ValueError, TypeError) as error:
        raise gr.Error(str(error), print_exception=False) from None


def image_from_upload(image: Image.Image | None, factor: int, max_side: int) -> np.ndarray:
    """An uploaded PIL image as float RGB [H, W, 3] in [0, 1]; bad uploads raise gr.Error.

    Checked here, before any mask or class, so that a bad upload is the first thing said.
    """
    if image is None:
        raise gr.Error("Upload an image first.", print_exception=False)
    if image.mode not in _ACCEPTED_MODES:
        raise gr.Error(
            f"The image has mode {image.mode}; upload an 8-bit RGB or greyscale image.",
            print_exception=False,
        )
    if "A" in image.getbands() or "transparency" in image.info:
        alpha = np.asarray(image.convert("RGBA"))[..., 3]
        if alpha.min() < 255:
            raise gr.Error(
                "The image has transparent pixels; upload an opaque RGB image.",
                print_exception=False,
            )
    if image.width % factor or image.height % factor:
        raise gr.Error(
            f"The image is {image.width}x{image.height} pixels; both sides must be multiples "
            f"of the tokenizer's downsampling factor {factor} (crop or resize it).",
            print_exception=False,
        )
    if max(image.size) > max_side:
        raise gr.Error(
            f"The image is {image.width}x{image.height} pixels; this page takes images up to "
            f"{max_side} pixels a side.",
            print_exception=False,
        )
    return images_io.from_pil(image)


def editor_parts(value: dict | None) -> tuple[Image.Image, list[Image.Image]]:
    """The background and painted layers of an ImageEditor value; none uploaded: gr.Error."""
    if not value or value.get("background") is None:
        raise gr.Error(
            "No image arrived: upload an image first (if one is shown, upload it again).",
            print_exception=False,
        )
    return value["background"], value.get("layers") or []


def mask_from_layers(layers: list[Image.Image], size: tuple[int, int]) -> np.ndarray:
    """Bool [H, W], True where any painted layer is not transparent; empty raises gr.Error."""
    mask = np.zeros((size[1], size[0]), bool)
    for layer in layers:
        if layer.size != size:
            raise gr.Error(
                f"The painted layer is {layer.width}x{layer.height} but the image is "
                f"{size[0]}x{size[1]}; upload the image again and repaint.",
                print_exception=False,
            )
        mask |= np.asarray(layer.convert("RGBA"))[..., 3] > 0
    if not mask.any():
        raise gr.Error("The mask is empty: paint over the area to redraw.", print_exception=False)
    return mask


def box_of(mask: np.ndarray) -> tuple[int, int, int, int]:
    """The pixel box (x0, y0, x1, y1; x1 and y1 exclusive) around a non-empty bool mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def parse_class_ids(text: str, num_classes: int) -> np.ndarray:
    """Comma- or space-separated class ids as int32 [N]; bad or out-of-range ids raise gr.Error."""
    words = text.replace(",", " ").split()
    if not words:
        raise gr.Error(f"Give at least one class id in [0, {num_classes}).", print_exception=False)
    try:
        ids = np.asarray([int(word) for word in words])
    except ValueError:
        raise gr.Error(
            f"Class ids must be integers; got {text!r}.", print_exception=False
        ) from None
    with _shown_on_page():
        return validation.check_labels(ids, num_classes)


def _class_id(value: float | None, num_classes: int) -> int:
    """One class id from a number field, checked against the model's classes."""
    if value is None:
        raise gr.Error(f"Give a class id in [0, {num_classes}).", print_exception=False)
    return int(parse_class_ids(str(int(value)), num_classes)[0])


def build_page(pipe: MaskGITPipeline, max_images: int = 64, max_side: int | None = None):
    """The Gradio page over `pipe`: one tab per task, the sampling options shared by all."""
    num_classes = int(pipe.config.num_classes)
    max_side = max_side or 8 * pipe.image_size
    defaults = pipe.options()
    class_hint = f"0 to {num_classes - 1}"
    model_event = dict(concurrency_limit=1, concurrency_id="model")
    # The brush's radius in image pixels: a quarter token.
    brush_size = max(1, pipe.factor // 4)

    def output_image(label: str, elem_id: str) -> gr.Image:
        return gr.Image(
            label=label,
            type="numpy",
            format="png",
            interactive=False,
            height=320,
            elem_id=elem_id,
            elem_classes="maskgit-pixels",
        )

    def painter(elem_id: str, label: str) -> gr.ImageEditor:
        return gr.ImageEditor(
            label=label,
            type="pil",
            image_mode="RGBA",
            format="png",
            sources=("upload", "clipboard"),
            brush=gr.Brush(brush_size, colors=["rgb(255, 0, 255)"], color_mode="fixed"),
            eraser=gr.Eraser(brush_size),
            layers=False,
            transforms=(),
            height=420,
            elem_id=elem_id,
        )

    def painted_request(task: str, prompt: str, class_name: str):
        """The painter, class field and button of a tab that edits a painted upload."""
        return (
            painter(f"{task}_input", prompt),
            gr.Number(
                0, label=f"{class_name} ({class_hint})", precision=0, elem_id=f"{task}_class"
            ),
            gr.Button(task.capitalize(), variant="primary", elem_id=task),
        )

    with gr.Blocks(title="MaskGIT demo", analytics_enabled=False) as page:
        gr.Markdown(
            f"# MaskGIT\n{num_classes} classes, {pipe.image_size}x{pipe.image_size} images "
            f"({pipe.grid_side}x{pipe.grid_side} tokens of {pipe.factor} pixels). Edited "
            f"images may be any size that is a multiple of {pipe.factor}, up to {max_side} "
            "pixels a side; the tokens under a mask plus one token of margin are redrawn."
        )
        with gr.Accordion("Sampling options", open=False):
            with gr.Row():
                seed = gr.Number(0, label="Seed", precision=0, elem_id="seed")
                num_steps = gr.Number(
                    defaults.num_steps, label="Steps to generate", precision=0, elem_id="num_steps"
                )
                start_step = gr.Number(
                    defaults.start_step, label="Start step to generate", precision=0
                )
                edit_steps = gr.Number(
                    editing.EDIT_NUM_STEPS, label="Steps to edit", precision=0, elem_id="edit_steps"
                )
                edit_start = gr.Number(
                    editing.EDIT_START_STEP,
                    label="Start step to edit",
                    precision=0,
                    info="Inpaint, outpaint and edit.",
                )
            with gr.Row():
                schedule = gr.Dropdown(
                    list(mask_schedule.SCHEDULES),
                    value=defaults.schedule,
                    label="Mask schedule",
                    allow_custom_value=True,
                    info="Or powK, e.g. pow3.",
                )
                ordering = gr.Dropdown(list(ORDERINGS), value=defaults.ordering, label="Ordering")
                choice_temperature = gr.Number(
                    defaults.choice_temperature, label="Choice temperature"
                )
                temperature = gr.Number(defaults.temperature, label="Temperature")
            with gr.Row():
                top_k = gr.Number(defaults.top_k or 0, label="Top-k", precision=0, info="0: all.")
                guidance_scale = gr.Number(defaults.guidance_scale, label="Guidance scale")
                force_guidance = gr.Checkbox(False, label="Guide a model without label dropout")
                dtype = gr.Dropdown(list(DTYPES), value=defaults.dtype, label="Compute dtype")
        option_inputs = [
            seed,
            num_steps,
            start_step,
            edit_steps,
            edit_start,
            schedule,
            ordering,
            choice_temperature,
            temperature,
            top_k,
            guidance_scale,
            force_guidance,
            dtype,
        ]

        def sampling(values: tuple, edits: bool) -> tuple[jax.Array, dict[str, Any]]:
            """The key and the option keywords of the pipeline (checked by it) for one task."""
            seed_value, steps, start, steps_to_edit, start_to_edit, *rest = values
            names = (
                "schedule",
                "ordering",
                "choice_temperature",
                "temperature",
                "top_k",
                "guidance_scale",
                "force_guidance",
                "dtype",
            )
            overrides = dict(zip(names, rest, strict=True))
            overrides["num_steps"] = steps_to_edit if edits else steps
            overrides["start_step"] = start_to_edit if edits else start
            for name in ("num_steps", "start_step"):
                if overrides[name] is None:
                    raise gr.Error(f"Give a value for {name}.", print_exception=False)
            if overrides["top_k"] is not None and overrides["top_k"] <= 0:
                overrides["top_k"] = None
            return jax.random.PRNGKey(int(seed_value or 0)), overrides

        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column():
                    classes = gr.Textbox(
                        ", ".join(str(i) for i in range(min(num_classes, 10))),
                        label=f"Classes ({class_hint}, comma-separated)",
                        elem_id="classes",
                    )
                    per_class = gr.Slider(1, 8, value=2, step=1, label="Images per class")
                    generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                generated = output_image("Samples (one row per class)", "generated")

        def generate(text: str, count: int, *values) -> np.ndarray:
            labels = np.repeat(parse_class_ids(text, num_classes), int(count))
            if labels.size > max_images:
                raise gr.Error(
                    f"{labels.size} images asked for; this page makes at most {max_images} "
                    "at a time.",
                    print_exception=False,
                )
            rng, overrides = sampling(values, edits=False)
            with _shown_on_page():
                images = pipe.generate(labels, rng, **overrides)
            rows = labels.size // int(count)
            row_labels = [str(label) for label in labels[:: int(count)]]
            return images_io.to_uint8(images_io.make_grid(images, rows, row_labels=row_labels))

        generate_button.click(
            generate, [classes, per_class, *option_inputs], generated, **model_event
        )

        with gr.Tab("Inpaint"):
            with gr.Row():
                with gr.Column():
                    inpaint_input, inpaint_class, inpaint_button = painted_request(
                        "inpaint", "Upload, then paint what to redraw", "Class"
                    )
                inpainted = output_image("Inpainted", "inpainted")

        def inpaint(value: dict | None, label: float | None, *values) -> np.ndarray:
            background, layers = editor_parts(value)
            image = image_from_upload(background, pipe.factor, max_side)
            mask = mask_from_layers(layers, background.size)
            label = _class_id(label, num_classes)
            rng, overrides = sampling(values, edits=True)
            with _shown_on_page():
                return images_io.to_uint8(pipe.inpaint(image, mask, label, rng, **overrides)[0])

        inpaint_button.click(
            inpaint, [inpaint_input, inpaint_class, *option_inputs], inpainted, **model_event
        )

        with gr.Tab("Outpaint"):
            with gr.Row():
                with gr.Column():
                    outpaint_input = gr.Image(
                        label="Image",
                        type="pil",
                        image_mode=None,
                        format="png",
                        sources=["upload", "clipboard"],
                        height=320,
                        elem_id="outpaint_input",
                        elem_classes="maskgit-pixels",
                    )
                    with gr.Row():
                        extends = [
                            gr.Number(
                                pipe.factor if side == "right" else 0,
                                label=f"Add {side} (pixels)",
                                precision=0,
                                step=pipe.factor,
                            )
                            for side in ("left", "right", "top", "bottom")
                        ]
                    outpaint_class = gr.Number(0, label=f"Class ({class_hint})", precision=0)
                    outpaint_button = gr.Button("Outpaint", variant="primary", elem_id="outpaint")
                outpainted = output_image("Outpainted", "outpainted")

        def outpaint(upload: Image.Image | None, label: float | None, *values) -> np.ndarray:
            image = image_from_upload(upload, pipe.factor, max_side)
            sides = [int(v or 0) for v in values[:4]]
            height, width = image.shape[0] + sides[2] + sides[3], image.shape[1] + sum(sides[:2])
            if max(height, width) > max_side:
                raise gr.Error(
                    f"The extended image would be {width}x{height} pixels; this page makes "
                    f"images up to {max_side} pixels a side.",
                    print_exception=False,
                )
            label = _class_id(label, num_classes)
            rng, overrides = sampling(values[4:], edits=True)
            with _shown_on_page():
                result = pipe.outpaint(image, *sides, label=label, rng=rng, **overrides)
            return images_io.to_uint8(result[0])

        outpaint_button.click(
            outpaint,
            [outpaint_input, outpaint_class, *extends, *option_inputs],
            outpainted,
            **model_event,
        )

        with gr.Tab("Edit"):
            with gr.Row():
                with gr.Column():
                    edit_input, edit_class, edit_button = painted_request(
                        "edit", "Upload, then paint over the box to redraw", "Target class"
                    )
                    edit_box = gr.Textbox(label="Box redrawn (x0, y0, x1, y1)", interactive=False)
                edited = output_image("Edited", "edited")

        def edit(value: dict | None, label: float | None, *values) -> tuple[np.ndarray, str]:
            background, layers = editor_parts(value)
            image = image_from_upload(background, pipe.factor, max_side)
            box = box_of(mask_from_layers(layers, background.size))
            label = _class_id(label, num_classes)
            rng, overrides = sampling(values, edits=True)
            with _shown_on_page():
                result = pipe.edit(image, box, label, rng, **overrides)
            return images_io.to_uint8(result[0]), ", ".join(map(str, box))

        edit_button.click(
            edit, [edit_input, edit_class, *option_inputs], [edited, edit_box], **model_event
        )
    return page


def main(argv: list[str]) -> None:
    """Loads the checkpoint (failing before serving if it cannot), then serves the page."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    directory = paths.absolute(_CHECKPOINT.value)
    try:
        pipe = MaskGITPipeline.from_pretrained(directory)
    except (OSError, ValueError) as error:
        sys.exit(f"error: cannot load --checkpoint={_CHECKPOINT.value}: {error}")
    page = build_page(pipe, _MAX_IMAGES.value, _MAX_SIDE.value)
    page.queue().launch(
        server_name=_HOST.value, server_port=_PORT.value, css=_CSS, ssr_mode=False, quiet=False
    )


if __name__ == "__main__":
    app.run(main)
