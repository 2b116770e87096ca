"""The notebooks in examples/ run top to bottom offline on the CPU with the bundled model, save their
plots, and are committed without outputs."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

import hf_sparsespec

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
# The plots each notebook must leave in HF_SPARSESPEC_OUTPUT.
PLOTS = {
    "01_quickstart.ipynb": ["01_tokens_per_s.png"],
    "02_inside_pillarattn.ipynb": [
        "02_selection_heatmap.png",
        "02_selection_per_head.png",
        "02_acceptance_sweep.png",
        "02_selection_mass.png",
    ],
    "03_streaming_and_pipeline.ipynb": ["03_streaming_bursts.png"],
}
KERNEL_NAME = "hf-sparsespec-test"
CELL_TIMEOUT_S = 900  # a hang guard only: a stuck cell fails the test instead of blocking the suite


def test_every_notebook_is_listed():
    assert sorted(p.name for p in NOTEBOOKS) == sorted(PLOTS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"code cell {i} of {path.name} has outputs: clear them before committing"
            assert cell.execution_count is None, f"code cell {i} of {path.name} has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_first_code_cell_takes_settings_from_the_environment(path):
    nb = nbformat.read(path, as_version=4)
    first = next(cell.source for cell in nb.cells if cell.cell_type == "code")
    for name in ("MODEL_ID", "DEVICE", "HF_SPARSESPEC_MODEL", "HF_SPARSESPEC_DEVICE", "HF_SPARSESPEC_SMALL", "HF_SPARSESPEC_OUTPUT"):
        assert name in first, f"the first code cell of {path.name} does not set {name}"


@pytest.fixture
def kernel_name(tmp_path, monkeypatch):
    """A kernelspec for this interpreter in a temporary Jupyter path: the kernel imports the same packages as
    the test, and nothing is installed into the user's or the environment's Jupyter directories."""
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "hf_sparsespec tests",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return KERNEL_NAME


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_offline_on_the_cpu(path, tmp_path, monkeypatch, kernel_name):
    out_dir = tmp_path / "plots"
    work_dir = tmp_path / "cwd"
    work_dir.mkdir()
    # The kernel inherits this environment: offline, CPU, bundled model, small sizes, plots to out_dir.
    monkeypatch.setenv("HF_SPARSESPEC_SMALL", "1")
    monkeypatch.setenv("HF_SPARSESPEC_DEVICE", "cpu")
    monkeypatch.setenv("HF_SPARSESPEC_MODEL", "bundled")
    monkeypatch.setenv("HF_SPARSESPEC_OUTPUT", str(out_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    # The kernel runs in work_dir, so it must import hf_sparsespec from where this test process does
    # (a source checkout is importable here only because pytest runs from the repository root).
    package_root = str(Path(hf_sparsespec.__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))

    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name=kernel_name, timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(work_dir)}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, when any cell raises

    printed = "".join(
        output.get("text", "") for cell in nb.cells if cell.cell_type == "code" for output in cell.outputs
    )
    # The settings cell reports what it picked: proof that the environment reached the kernel.
    assert "MODEL_ID=bundled DEVICE=cpu SMALL=True" in printed
    assert "hf_sparsespec" in printed and str(Path(package_root)) in printed

    for name in PLOTS[path.name]:
        plot = out_dir / name
        assert plot.exists(), f"{path.name} did not save {name}"
        check_png(plot)


def check_png(path: Path) -> None:
    """A real figure: a PNG of reasonable size whose pixels are not all one colour."""
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    assert len(data) > 10_000, f"{path.name} is only {len(data)} bytes"
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] >= 300 and pixels.shape[1] >= 400, f"{path.name} is {pixels.shape[:2]} pixels"
    assert float(pixels[..., :3].std()) > 0.05, f"{path.name} is nearly blank"
