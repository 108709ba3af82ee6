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
# runs that revision without installing it. DEST/REV/py also holds the package's metadata with
# its entry points, so torch.compile(backend="misa") finds the backend as it would installed.
# No .git is needed where the trees run (copy DEST to the GPU host). Revisions are named by their DEST folder: a branch name with a slash makes
# nested folders.
set -euo pipefail

# The dist-info folder importlib.metadata reads: name, version and the pyproject's entry points.
write_metadata() {
    python3 - "$1" "$2" <<'PY'
import pathlib, sys, tomllib
project = tomllib.loads(pathlib.Path(sys.argv[1]).read_text())["project"]
info = pathlib.Path(sys.argv[2]) / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
info.mkdir()
(info / "METADATA").write_text(
    f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
groups = dict(project.get("entry-points", {}), console_scripts=project.get("scripts", {}))
(info / "entry_points.txt").write_text("".join(
    f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in points.items()) + "\n"
    for group, points in groups.items() if points))
PY
}
dest=$1; shift
for rev in "$@"; do
    tree="$dest/$rev"
    rm -rf "$tree"
    mkdir -p "$tree/src" "$tree/py"
    git archive "$rev" | tar -x -C "$tree/src"
    mv "$tree/src/misa_compile" "$tree/py/misa_compile"
    mv "$tree/src/kernels" "$tree/py/misa_compile/kernels"
    mv "$tree/src/passes" "$tree/py/misa_compile/passes"
    write_metadata "$tree/src/pyproject.toml" "$tree/py"
    echo "$tree: $(git rev-parse --short "$rev")"
done
