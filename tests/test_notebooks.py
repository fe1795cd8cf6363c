"""The notebooks: each executes from top to bottom without error (nbclient, this
interpreter's kernel) and prints what its committed .ipynb shows, numbers aside; each
committed .ipynb is the jupytext pair of its .py source with its outputs (plots included)
saved."""

import base64
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
jupytext = pytest.importorskip("jupytext")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
SOURCES = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))


def test_every_notebook_source_has_its_executed_pair():
    """The four notebooks the README links (01-04) at least, and no .py without its
    .ipynb or .ipynb without its .py."""
    stems = {p.stem for p in SOURCES}
    assert {
        "01_hand_vs_autodiff",
        "02_batch_inhib",
        "03_two_branch_by_hand",
        "04_data_parallel",
    } <= stems, stems
    assert stems == {p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")}


def test_notebooks_assert_their_claims():
    """Each notebook checks what its text claims with assertions, so a false claim fails
    test_notebook_executes (not only a crash)."""
    for py in SOURCES:
        assert "\nassert " in py.read_text() or "np.testing.assert" in py.read_text(), py.name


def cells(nb):
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


@pytest.mark.parametrize("py", SOURCES, ids=[p.stem for p in SOURCES])
def test_pair_matches_and_outputs_are_committed(py):
    ipynb = py.with_suffix(".ipynb")
    assert ipynb.exists(), f"{ipynb.name} missing: jupytext --to ipynb, then execute it"
    committed = nbformat.read(ipynb, as_version=4)
    assert cells(jupytext.read(py)) == cells(committed), (
        f"{py.name} and {ipynb.name} differ: re-pair with `jupytext --sync {py}` and re-run"
    )
    code = [c for c in committed.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), "commit the notebook executed"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    pngs = [
        o["data"]["image/png"]
        for c in code
        for o in c.outputs
        if "data" in o and "image/png" in o["data"]
    ]
    assert pngs, "no plot saved in the notebook"
    assert all(base64.b64decode(p)[:4] == b"\x89PNG" for p in pngs)


@pytest.mark.parametrize("py", SOURCES, ids=[p.stem for p in SOURCES])
def test_notebook_executes(py):
    # The kernel inherits this process's XLA_FLAGS (tests/conftest.py): compiling
    # dominates, and what the notebooks assert is accuracy, never speed.
    nb = jupytext.read(py)
    nbclient.NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",  # jupyter_client starts it with this interpreter
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    ).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code)
    # The committed outputs are this run's, up to the numbers: a table that gained rows,
    # a changed label or a check mark turned to a cross means the committed notebook is
    # stale (re-execute it). Numbers are left out: timings vary, and round-off may differ
    # on another CPU; what the numbers must satisfy, the notebook asserts.
    committed = nbformat.read(py.with_suffix(".ipynb"), as_version=4)
    stored = [c for c in committed.cells if c.cell_type == "code"]
    for i, (ran, kept) in enumerate(zip(code, stored, strict=True)):
        assert _shape_of_outputs(ran) == _shape_of_outputs(kept), (
            f"{py.stem}: code cell {i} printed text other than the committed notebook's; "
            f"re-execute {py.with_suffix('.ipynb').name}"
        )


_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _shape_of_outputs(cell):
    """A code cell's printed text and rich text (stdout, text/markdown, text/plain), its
    numbers replaced by '#' and its runs of white space by one space."""
    out = []
    for o in cell.outputs:
        if o.output_type == "stream" and o.name == "stdout":
            text = o.text
        elif "data" in o:
            data = o["data"]
            text = data.get("text/markdown") or (
                "" if "image/png" in data else data.get("text/plain", "")
            )
        else:
            continue
        out.append(" ".join(_NUMBER.sub("#", text).split()))
    return out
