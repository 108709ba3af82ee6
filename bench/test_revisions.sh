#!/bin/bash
# GPU tests of a revision tree that bench/revision_trees.sh made (run that where git is; this
# where the GPU is), without installing it:
#
#     bash bench/test_revisions.sh DEST REV NAME PYTEST_ARGS...
#
# e.g. `bash bench/test_revisions.sh ab fp8-checks fp8 tests/gpu/test_fp8_gpu.py`. Runs for at
# most REV_TIMEOUT seconds (default 300); the output goes to LOGS/test.REV.NAME.log (LOGS is $OUT
# when set, so that a device call that runs out of time still returns it, else DEST) and its
# last line (pytest's summary) is printed.
set -uo pipefail
dest=$(cd "$1" && pwd); rev=$2; name=$3; shift 3
log="${OUT:-$dest}/test.$rev.$name.log"
(cd "$dest/$rev/src" && PYTHONPATH=../py:. timeout "${REV_TIMEOUT:-300}" \
    python3 -m pytest -q -p no:cacheprovider "$@" >"$log" 2>&1)
echo "$rev $name (exit $?): $(tail -n 1 "$log")"
