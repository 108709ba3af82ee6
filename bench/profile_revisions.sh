#!/bin/bash
# profile_stages.py sections of several revisions, one after the other on this card, from the
# importable copies that bench/revision_trees.sh made (run that where git is; this where the GPU
# is):
#
#     bash bench/profile_revisions.sh DEST SECTIONS REV [REV ...]
#
# e.g. `bash bench/profile_revisions.sh ab router main router-rows`. Each revision runs in its own
# process, for at most REV_TIMEOUT seconds (default 300: a first run compiles and tunes); its
# output goes to LOGS/REV.SECTIONS.log (SECTIONS with commas as dots; LOGS is $OUT when set, so
# that a device call that runs out of time still returns the logs written so far, else DEST) and
# its last line (the JSON of its times) is printed after the revision's name.
set -uo pipefail
dest=$(cd "$1" && pwd); sections=$2; shift 2
logs=${OUT:-$dest}
for rev in "$@"; do
    log="$logs/$rev.${sections//,/.}.log"
    (cd "$dest/$rev/src" && PYTHONPATH=../py:bench timeout "${REV_TIMEOUT:-300}" \
        python3 bench/profile_stages.py --only "$sections" >"$log" 2>&1)
    echo "$rev (exit $?): $(tail -n 1 "$log")"
done
