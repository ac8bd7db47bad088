#!/bin/sh
# Static analysis with what busybox has: every script parses (`sh -n`), has
# `set -eu`, and no line ends in whitespace.
set -eu
cd "$(dirname "$0")"
status=0
for f in app.sh lint.sh test/*.sh; do
    sh -n "$f" || { echo "$f: syntax error"; status=1; }
    grep -q '^set -eu' "$f" || { echo "$f: missing 'set -eu'"; status=1; }
    if grep -n '[[:space:]]$' "$f"; then
        echo "$f: trailing whitespace"
        status=1
    fi
done
[ "$status" = 0 ] && echo "lint: clean"
exit "$status"
