import os

import pytest

from tests.conftest import REPO_ROOT

NOTEBOOK = REPO_ROOT / "notebooks" / "sampling.ipynb"


def test_sampling_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel imports maskgit_jax from this checkout and runs in an empty directory.
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    monkeypatch.setenv("PYTHONPATH", path)
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    started = False
    try:
        with client.setup_kernel():
            started = True
            for index, cell in enumerate(notebook.cells):
                client.execute_cell(cell, index)
    except Exception as error:
        if not started:
            pytest.skip(f"no Jupyter kernel could be started: {error!r}")
        raise
    outputs = [
        output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    ]
    assert not [o for o in outputs if o.output_type == "error"]
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "classes" in printed
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(images) == 2  # The class grid and the editing row.
