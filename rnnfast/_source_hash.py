"""The fingerprint of the extension's sources.

setup.py records it in rnnfast/_built_from.py after a build; `import rnnfast` recomputes it
from csrc/ (when the package runs from a source checkout) to tell a stale build from a current
one. Kept free of imports from the package so setup.py can load it before anything is built.
"""
import hashlib
import os


def source_hash(root, with_cuda):
    """sha256 over the paths and contents of the files under root/csrc that a build compiles
    (csrc/cuda only in a build with CUDA), first 16 hex digits."""
    digest = hashlib.sha256()
    csrc = os.path.join(root, "csrc")
    paths = []
    for folder, _, files in os.walk(csrc):
        relative = os.path.relpath(folder, csrc).replace(os.sep, "/")
        if not with_cuda and (relative == "cuda" or relative.startswith("cuda/")):
            continue
        paths.extend(os.path.join(folder, name) for name in files)
    for path in sorted(paths):
        digest.update(os.path.relpath(path, root).replace(os.sep, "/").encode())
        with open(path, "rb") as source:
            digest.update(source.read())
    return digest.hexdigest()[:16]
