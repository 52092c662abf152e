"""`import rnnfast` explains a missing or stale compiled extension instead of failing bare, and
loads nothing of torch beyond what `import torch` loads."""
import glob
import os
import shutil
import subprocess
import sys

import rnnfast

PACKAGE_DIR = os.path.dirname(rnnfast.__file__)
SOURCE_ROOT = os.path.dirname(PACKAGE_DIR)


def copy_project(destination, with_extension):
    """A copy of the package (and csrc/, so it counts as a source checkout) under destination."""
    ignore = shutil.ignore_patterns("__pycache__", "tasks", "data")
    shutil.copytree(PACKAGE_DIR, os.path.join(destination, "rnnfast"), ignore=ignore)
    shutil.copytree(os.path.join(SOURCE_ROOT, "csrc"), os.path.join(destination, "csrc"))
    if not with_extension:
        for built in glob.glob(os.path.join(destination, "rnnfast", "_C*")):
            os.remove(built)


# An editable install maps rnnfast._C to the checkout's build whatever sys.path says; the copy
# must be imported on its own, so its finder is taken out first.
IMPORT_COPY = ("import os, sys; "
               "sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f)]; "
               "import rnnfast; assert rnnfast._ops._C.__file__.startswith(os.getcwd())")


def import_error_of(root):
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_COPY], cwd=root, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(root), "RNNFAST_ALLOW_STALE": "0"})
    return result.returncode, result.stderr


def test_missing_extension_says_how_to_build(tmp_path):
    copy_project(tmp_path, with_extension=False)
    code, stderr = import_error_of(tmp_path)
    assert code != 0
    assert "rnnfast._C is missing" in stderr
    assert "pip install -e . --no-build-isolation" in stderr


def test_stale_extension_is_refused(tmp_path):
    copy_project(tmp_path, with_extension=True)
    code, stderr = import_error_of(tmp_path)
    assert code == 0, stderr  # an exact copy is current
    with open(tmp_path / "csrc" / "cells.h", "a") as source:
        source.write("\n// changed\n")
    code, stderr = import_error_of(tmp_path)
    assert code != 0
    assert "stale" in stderr and "pip install -e . --no-build-isolation" in stderr


def test_import_loads_no_more_of_torch():
    """`import rnnfast` loads no module of torch that `import torch` did not: torch._dynamo
    (1.2 s and 800 modules, sympy's among them) only once a model is compiled."""
    probe = ("import sys, torch; before = set(sys.modules); import rnnfast; "
             "added = sorted(set(sys.modules) - before); "
             "loaded = [m for m in added if m.split('.')[0] in ('torch', 'sympy')]; "
             "assert not loaded, loaded[:5]")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
