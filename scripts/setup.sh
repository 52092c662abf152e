#!/usr/bin/env bash
# Installs rnnfast and everything it needs into the current Python (python3, or $PYTHON).
# Safe to run again: what is already there is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

# torch first: the extension is compiled against the torch that is installed. An unpinned
# "torch" on a machine without it would pull a large CUDA build; 2.13.0 is the tested version.
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  "$PYTHON" -m pip install "torch==2.13.0"
fi
"$PYTHON" -m pip install -r requirements.txt
# Without build isolation, so the build sees the installed torch.
"$PYTHON" -m pip install --no-build-isolation -e .
"$PYTHON" -c "import rnnfast, torch; print('rnnfast', rnnfast.__version__, 'built for torch', torch.__version__)"
