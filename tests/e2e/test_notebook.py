"""notebooks/kpis.ipynb runs top to bottom, headless, against a store built from the demo stream.

The store is written the way the live publisher writes it (10 s panes with
``SeriesStore.write``, rolled up to 1 m and 1 h), every window final; the
notebook finds it through ``KPISTREAM_STORE`` and runs in a kernel of this
interpreter (a kernel spec written under tmp_path), from the repository root.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
kernelspec = pytest.importorskip("ipykernel.kernelspec")
pytest.importorskip("matplotlib")

from kpistream.demo_store import build_demo_store  # noqa: E402
from kpistream.store.series import open_store  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "kpis.ipynb"
KERNEL = "kpistream-test"


def _code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_committed_notebook_is_clean():
    """No outputs stored; a parameters cell reads the store path from the environment."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    cells = _code_cells(nb)
    assert cells
    assert all(not c.outputs and c.execution_count is None for c in cells)
    params = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    assert 'os.environ.get("KPISTREAM_STORE", "data/store")' in params[0].source


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory) -> Path:
    # ~5.5 minutes of event time at 12 requests/s: 34 panes, 6 minutes, 12 series
    path = tmp_path_factory.mktemp("store") / "store"
    build_demo_store(path, n_requests=4000, seed=3, rate_per_s=12)
    with open_store(path, readonly=True) as store:
        info = store.info()
    res = info["resolutions"]
    assert res["10s"]["rows"] > 0 and res["1m"]["rows"] > 0
    assert all(r["provisional_rows"] == 0 for r in res.values())
    return path


@pytest.fixture(scope="module")
def executed(demo_store, tmp_path_factory):
    """The notebook, executed by nbclient with KPISTREAM_STORE pointing at the demo store."""
    jupyter = tmp_path_factory.mktemp("jupyter")
    # a kernel spec for this very interpreter, so the kernel sees the same packages
    kernelspec.write_kernel_spec(jupyter / "kernels" / KERNEL,
                                 overrides={"display_name": "kpistream test"})
    nb = nbformat.read(NOTEBOOK, as_version=4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KPISTREAM_STORE", str(demo_store))
        mp.setenv("JUPYTER_PATH", str(jupyter))
        mp.setenv("MPLBACKEND", "Agg")          # headless; the notebook renders inline PNGs
        mp.setenv("PYTHONPATH", os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
        client = nbclient.NotebookClient(nb, timeout=120, kernel_name=KERNEL,
                                         resources={"metadata": {"path": str(ROOT)}})
        client.execute()
    return nb


def _outputs(nb):
    return [o for c in _code_cells(nb) for o in c.outputs]


def test_notebook_runs_without_errors(executed):
    cells = _code_cells(executed)
    assert all(c.execution_count is not None for c in cells)
    errors = [o for o in _outputs(executed) if o.output_type == "error"]
    assert not errors, [f"{o.ename}: {o.evalue}" for o in errors]


def test_notebook_reads_the_given_store(executed, demo_store):
    text = "".join(o.get("text", "") for o in _outputs(executed) if o.output_type == "stream")
    assert str(demo_store) in text                       # KPISTREAM_STORE was used
    assert "12 series" in text
    assert "shadow - primary accuracy over" in text      # section 4 ran its comparison


def test_notebook_shows_figures_and_tables(executed):
    data = [o.data for o in _outputs(executed) if o.output_type in ("display_data", "execute_result")]
    images = [d for d in data if "image/png" in d]
    assert len(images) >= 3                              # quality, latency, paired difference
    html = [d["text/html"] for d in data if "text/html" in d]
    # the store overview, the series rows, the latest-window pivot, the paired windows
    assert len(html) >= 4
    pivot = [t for t in html if "churn" in t and "latency_p99" in t and "f1" in t]
    assert pivot, "no table of the latest window's KPIs per model / version / variant"
    assert any("shadow" in t and "difference" in t for t in html)
