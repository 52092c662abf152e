"""Packaging: what a build without torch says, what the sdist carries, and that the sdist
builds and installs on its own (a whole build: marked slow)."""
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_SUFFIXES = (".h", ".cuh", ".cu", ".cpp")


def clean_env(**extra):
    """The environment without PYTHONPATH, so a subprocess sees only what is installed."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    out = tmp_path_factory.mktemp("sdist")
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(out)], cwd=ROOT,
                   check=True, capture_output=True, text=True, timeout=300)
    (tarball,) = out.glob("rnnfast-*.tar.gz")
    return tarball


def test_build_without_torch_says_what_to_do():
    """As under pip's build isolation, where the installed torch cannot be imported."""
    run_setup_without_torch = (
        "import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; "
        "runpy.run_path('setup.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", run_setup_without_torch], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Install torch first" in proc.stderr
    assert "pip install --no-build-isolation ." in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


def test_sdist_carries_every_source_and_no_build_output(sdist):
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    sources = {path.relative_to(ROOT).as_posix() for path in (ROOT / "csrc").rglob("*")
               if path.suffix in SOURCE_SUFFIXES}
    assert any(name.endswith(".cu") for name in sources)  # the CUDA engine's too
    assert sources <= names, sorted(sources - names)
    for required in ("setup.py", "pyproject.toml", "rnnfast/_source_hash.py",
                     "rnnfast/tasks/__main__.py"):
        assert required in names
    assert not [name for name in names if name.endswith(".so") or "_built_from" in name]


@pytest.mark.slow
def test_sdist_builds_installs_and_matches_torch_nn(sdist, tmp_path):
    """pip wheel from the tarball alone, installed into a fresh virtualenv (which sees the
    installed torch), imported from outside the checkout."""
    # The CPU engine only, in its portable copy only, unoptimised: the CUDA sources' presence is
    # checked above, the AVX copies by tests/test_cpu_dispatch.py, the optimised code by every
    # other test. nvcc or the AVX copies would make this build several times longer, -O3 about
    # 1.6 times as long.
    env = clean_env(RNNFAST_NO_CUDA="1", RNNFAST_CPU_CAPABILITIES="DEFAULT", RNNFAST_OPT_LEVEL="0")
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
                    "-w", str(wheels), str(sdist)],
                   cwd=tmp_path, env=env, check=True, capture_output=True, text=True, timeout=1800)
    (wheel,) = wheels.glob("rnnfast-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                   check=True, timeout=300)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "--no-deps", str(wheel)],
                   env=env, check=True, capture_output=True, text=True, timeout=300)
    check = """
import sys
import torch
import rnnfast
assert rnnfast.__file__.startswith(sys.prefix), rnnfast.__file__
torch.manual_seed(0)
reference = torch.nn.LSTM(3, 5, num_layers=2, batch_first=True)
lstm = rnnfast.LSTM(3, 5, num_layers=2, batch_first=True)
lstm.load_state_dict(reference.state_dict())
x = torch.randn(4, 7, 3)
torch.testing.assert_close(lstm(x)[0], reference(x)[0])
assert rnnfast.cpu_capability() == "DEFAULT", rnnfast.cpu_capability()
print("installed rnnfast matches torch.nn")
"""
    proc = subprocess.run([python, "-c", check], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "installed rnnfast matches torch.nn" in proc.stdout
