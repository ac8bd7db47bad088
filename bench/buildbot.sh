#!/usr/bin/env bash
# Runs the Buildbot peer harness (../shared/peers/buildbot, read-only) from a
# scratch copy, because it writes .venv/ and work/ next to itself.
#
#   bench/buildbot.sh                # small knobs (about 5 min on 2 cores)
#   WORKERS=4 PICKUP_BUILDS=50 ... bench/buildbot.sh   # any run.sh knob
#
# Env: BUILDBOT_HARNESS (the peer folder), CAPSTAN_BUILDBOT_DIR (the scratch
# copy, default ~/.cache/capstan-buildbot; its .venv is reused across runs).
# The last lines of the output are the harness's `buildbot ...` summary lines,
# which capstan-bench parses.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SRC="${BUILDBOT_HARNESS:-$HERE/../../shared/peers/buildbot}"
[ -d "$SRC" ] || SRC=/work/shared/peers/buildbot
DST="${CAPSTAN_BUILDBOT_DIR:-$HOME/.cache/capstan-buildbot}"
mkdir -p "$DST"
cp "$SRC/run.sh" "$SRC/bench.py" "$SRC/master.cfg" "$DST/"
export WORKERS="${WORKERS:-4}" PICKUP_BUILDS="${PICKUP_BUILDS:-30}" \
  THROUGHPUT_BUILDS="${THROUGHPUT_BUILDS:-100}" LOG_MB="${LOG_MB:-20}" \
  SCALE_WORKERS="${SCALE_WORKERS:-0}" DB_MODES="${DB_MODES:-disk}" REPEAT="${REPEAT:-1}"
exec "$DST/run.sh" --work "$DST/work"
