"""The layering the request processor makes possible: the frontend process loads no pagedserve
(no engine, no tqdm) and no torch; the offline package loads nothing of the frontend; the
processor itself needs no torch. Each checked in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

import pytest

from shared.version import VERSION

CASES = [
    ("services.frontend.server", ("pagedserve", "tqdm", "torch")),
    ("pagedserve.llm", ("services.frontend",)),
    ("pagedserve.serve", ("services.frontend",)),
    ("shared.frontend_args", ("services", "pagedserve")),
    ("shared.processor.processor", ("torch", "services", "pagedserve")),
    ("shared.processor.stop", ("torch", "services", "pagedserve")),
]


@pytest.mark.parametrize("module,forbidden", CASES)
def test_imports_stay_in_their_layer(module, forbidden):
    code = (f"import sys, {module}; print(sorted({{m.split('.')[0] if m.split('.')[0] != 'services' else "
            f"'.'.join(m.split('.')[:2]) for m in sys.modules}}))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert not [f for f in forbidden if f"'{f}'" in loaded], loaded


def test_version_is_the_installed_distribution():
    from importlib.metadata import version

    import pagedserve

    assert pagedserve.__version__ == VERSION == version("pagedserve")
