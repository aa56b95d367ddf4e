"""The core library and the CLI must not import napari, Qt or torch where they do not need them.

The checks run in a fresh interpreter. Empty stand-in packages for every GUI module are put on
``sys.path`` first, so an import of one of them would succeed (and be seen) even where napari
and Qt are not installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

GUI_MODULES = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "vispy")


@pytest.fixture
def fake_gui_path(tmp_path: Path) -> Path:
    for name in GUI_MODULES:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    return tmp_path


def _run(code: str, extra_path: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(extra_path), env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_fake_gui_modules_are_importable(fake_gui_path: Path) -> None:
    # Guards the other tests: the stand-ins must be what an accidental import would find.
    proc = _run("import sys, napari, qtpy, magicgui; print('napari' in sys.modules)", fake_gui_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"


def test_core_and_cli_import_no_gui_modules(fake_gui_path: Path) -> None:
    proc = _run(
        f"""
        import sys
        import napari_revolver
        from napari_revolver import RevolverPredictor
        import napari_revolver.cli, napari_revolver.core.predictor, napari_revolver.core.train
        assert RevolverPredictor.__name__ == "RevolverPredictor"
        gui = sorted(m for m in sys.modules if m.split(".")[0] in {GUI_MODULES!r})
        print(",".join(gui))
        """,
        fake_gui_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""


def test_plain_package_import_does_not_import_torch(fake_gui_path: Path) -> None:
    proc = _run(
        """
        import sys
        import napari_revolver
        print(napari_revolver.__version__)
        print("torch" in sys.modules)
        """,
        fake_gui_path,
    )
    assert proc.returncode == 0, proc.stderr
    version, has_torch = proc.stdout.split()
    assert version
    assert has_torch == "False"
