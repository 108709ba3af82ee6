#!/bin/bash
# Importable copies of git revisions, to time them side by side on one card in one session:
#
#     bash bench/revision_trees.sh DEST REV [REV ...]
#
# DEST/REV/src holds the revision's files (bench/, tests/, ...) and DEST/REV/py its package as
# installed (misa_compile with kernels/ and passes/ inside, as pyproject.toml maps them), so
#
#     cd DEST/REV/src && PYTHONPATH=../py:bench python3 bench/profile_stages.py --only router
#
# runs that revision without installing it. No .git is needed where the trees run (copy DEST
# to the GPU host). Revisions are named by their DEST folder: a branch name with a slash makes
# nested folders.
set -euo pipefail
dest=$1; shift
for rev in "$@"; do
    tree="$dest/$rev"
    rm -rf "$tree"
    mkdir -p "$tree/src" "$tree/py"
    git archive "$rev" | tar -x -C "$tree/src"
    mv "$tree/src/misa_compile" "$tree/py/misa_compile"
    mv "$tree/src/kernels" "$tree/py/misa_compile/kernels"
    mv "$tree/src/passes" "$tree/py/misa_compile/passes"
    echo "$tree: $(git rev-parse --short "$rev")"
done
