#!/usr/bin/env bash
# Installs rnnfast and everything it needs into the current Python (python3, or $PYTHON).
# Safe to run again: what is already there is kept, and the extension is rebuilt only when
# its sources or torch changed (then only the changed sources are recompiled).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

# torch first: the extension is compiled against the torch that is installed. An unpinned
# "torch" on a machine without it would pull a large CUDA build; 2.13.0 is the tested version.
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  "$PYTHON" -m pip install "torch==2.13.0"
fi
"$PYTHON" -m pip install -r requirements.txt

# The build is current when rnnfast imports from outside the project folder (so it is
# installed) from this folder, and was built for the torch installed now; `import rnnfast`
# itself refuses a build older than the sources in csrc/.
build_is_current() {
  local project
  project=$(pwd -P)
  (cd / && "$PYTHON" - "$project" <<'PY'
import os, sys
import torch
import rnnfast
from rnnfast import _built_from
project = sys.argv[1]
installed_here = os.path.dirname(os.path.realpath(rnnfast.__file__)) == os.path.join(project, "rnnfast")
sys.exit(0 if installed_here and getattr(_built_from, "TORCH_VERSION", None) == torch.__version__ else 1)
PY
  ) >/dev/null 2>&1
}
if build_is_current; then
  echo "rnnfast: the installed build is current; nothing to compile"
else
  # Without build isolation, so the build sees the installed torch. The first build compiles
  # the whole extension (README.md says how long it takes).
  "$PYTHON" -m pip install --no-build-isolation -e .
fi
"$PYTHON" -c "import rnnfast, torch; print('rnnfast', rnnfast.__version__, 'built for torch', torch.__version__)"
