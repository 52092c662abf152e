#!/usr/bin/env bash
# The lint step of the README's test command: pyflakes' checks of the Python code (ruff, see
# pyproject.toml), and the C++ and CUDA sources in the layout of .clang-format (clang-format 18
# from its pip package, requirements.txt; `clang-format -i` on a file puts it in that layout).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -m ruff check .
CLANG_FORMAT=$("$PYTHON" -c "import clang_format, os; print(os.path.join(os.path.dirname(clang_format.__file__), 'data', 'bin', 'clang-format'))")
"$CLANG_FORMAT" --dry-run --Werror csrc/*.h csrc/*.cpp csrc/cpu/*.h csrc/cpu/*.cpp \
  csrc/cuda/*.h csrc/cuda/*.cuh csrc/cuda/*.cu
