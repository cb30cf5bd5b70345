import json
import os

import pytest

from tests.conftest import REPO_ROOT

NOTEBOOK = REPO_ROOT / "notebooks" / "sampling.ipynb"

# Run in the notebook's kernel after its last cell: facts about what the notebook computed,
# printed as one JSON line. Where an edit's blurred token mask does not reach, the output must
# be the input exactly (the compositing is alpha * generated + (1 - alpha) * input).
FACTS = r"""
import json

import numpy as np

from maskgit_jax.sampling import editing


def untouched(token_mask):
    pixels = np.repeat(np.repeat(token_mask.astype(np.float32), pipe.factor, 1), pipe.factor, 2)
    return editing.gaussian_blur(pixels, pipe.image_size / 16 - 1) == 0


def summary(output):
    in_range = np.isfinite(output).all() and output.min() >= 0 and output.max() <= 1
    return {"shape": list(output.shape), "finite_in_range": bool(in_range)}


def kept_and_changed(output, original, keep):
    keep = np.broadcast_to(keep[..., None], original.shape)
    diff = np.abs(output - original)
    return summary(output) | {
        "kept_pixels": int(keep[..., 0].sum()),
        "kept_max_diff": float(diff[keep].max()) if keep.any() else None,
        "changed_max_diff": float(diff[~keep].max()),
    }


n = len(inputs)
inpaint_cells = editing.token_mask_from_pixels(np.broadcast_to(mask, (n, size, size)), pipe.factor)
canvas = np.full(outpainted.shape, 0.5, np.float32)
canvas[:, :, :size] = inputs
new_area = np.ones(outpainted.shape[:3], bool)
new_area[:, :, :size] = False
edit_cells = editing.token_mask_from_box(edit_box, size, size, pipe.factor)
edit_cells = np.broadcast_to(edit_cells, (n, *edit_cells.shape))
real = None
if not IMAGENET:
    from maskgit_jax.data.datasets import digits

    all_digits, all_labels = digits.digits_arrays()
    real = all(
        any(np.array_equal(p, d) for d in all_digits[all_labels == label])
        for p, label in zip(pictures, input_labels, strict=True)
    )
print(json.dumps({
    "model": MODEL,
    "image_size": size,
    "num_classes": int(pipe.config.num_classes),
    "labels": len(labels),
    "samples": summary(samples),
    "inputs": list(inputs.shape),
    "inputs_std": float(inputs.std()),
    "inputs_are_real_digits": real,
    "input_labels": [int(x) for x in input_labels],
    "mask_pixels": int(mask.sum()),
    "inpaint": kept_and_changed(inpainted, inputs, untouched(inpaint_cells)),
    "outpaint": kept_and_changed(
        outpainted, canvas, untouched(editing.token_mask_from_pixels(new_area, pipe.factor))
    ),
    "edit": kept_and_changed(edited, inputs, untouched(edit_cells)),
}))
"""


def _run(notebook, tmp_path, monkeypatch):
    """Executes every cell, then FACTS, in one kernel; returns FACTS' printed dict.

    FACTS runs as an extra last cell, removed again afterwards.
    """
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    # The kernel imports maskgit_jax from this checkout and runs in an empty directory, so
    # the released checkpoints (./maskgit-public) are absent.
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    monkeypatch.setenv("PYTHONPATH", path)
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    facts_cell = nbformat.v4.new_code_cell(FACTS)
    started = False
    try:
        with client.setup_kernel():
            started = True
            notebook.cells.append(facts_cell)
            for index, cell in enumerate(notebook.cells):
                client.execute_cell(cell, index)
    except Exception as error:
        if not started:
            pytest.skip(f"no Jupyter kernel could be started: {error!r}")
        raise
    finally:
        if notebook.cells and notebook.cells[-1] is facts_cell:
            notebook.cells.pop()
    (line,) = [o.text for o in facts_cell.outputs if o.get("name") == "stdout"]
    return json.loads(line)


def test_sampling_notebook_runs_offline_and_edits_real_images(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    # The saved notebook keeps no outputs.
    assert not [cell for cell in code_cells if cell.outputs or cell.execution_count]
    # Colab-only steps: one URL to set, the package install, the released files from the bucket.
    source = "\n".join(cell.source for cell in code_cells)
    assert 'REPO_URL = "' in source and '"google.colab" in sys.modules' in source
    for released in ("tokenizer_imagenet", "maskgit_imagenet", "gs://maskgit-public/checkpoints/"):
        assert released in source
    for method in ("from_official(", ".generate(", ".inpaint(", ".outpaint(", ".edit("):
        assert method in source

    facts = _run(notebook, tmp_path, monkeypatch)

    outputs = [output for cell in code_cells for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    # Off Colab nothing is installed or copied, and the released files are not there.
    assert "Not in Colab: skipping the install" in printed
    assert "released checkpoints: not in maskgit-public" in printed
    # The embedded default, or (where it was never trained) the tiny random-weight model.
    assert facts["model"] in ("embedded default (digits)", "tiny random-weight model")
    assert f"{facts['model']}: 16px images, 10 classes" in printed
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    # The class grid, confidence vs Halton, inpainting, outpainting and editing.
    assert len(images) == 5

    size = facts["image_size"]
    assert facts["labels"] == 4 * facts["num_classes"]
    assert facts["samples"]["shape"] == [facts["labels"], size, size, 3]
    assert facts["samples"]["finite_in_range"]
    # Four real scikit-learn digits with their true labels, not noise or blanks.
    assert facts["inputs"] == [4, size, size, 3]
    assert facts["inputs_are_real_digits"] is True
    assert facts["input_labels"] == [0, 3, 5, 8]
    assert facts["inputs_std"] > 0.1
    assert facts["mask_pixels"] == size * size // 2
    expected_shapes = {
        "inpaint": [4, size, size, 3],
        "outpaint": [4, size, size + size // 2, 3],
        "edit": [4, size, size, 3],
    }
    for operation, shape in expected_shapes.items():
        result = facts[operation]
        assert result["shape"] == shape, operation
        assert result["finite_in_range"], operation
        # Some pixels are out of the edit's reach, and there the output is the input exactly;
        # within its reach the model's pixels replaced some of the input's.
        assert result["kept_pixels"] > 0, operation
        assert result["kept_max_diff"] == 0.0, operation
        assert result["changed_max_diff"] > 0.01, operation
