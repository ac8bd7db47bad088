#!/bin/sh
# Unit tests of app.sh: source it and check its functions.
set -eu
cd "$(dirname "$0")/.."
APP_SOURCE_ONLY=1
. ./app.sh

fail=0
check() {
    if [ "$2" = "$3" ]; then
        echo "ok   $1"
    else
        echo "FAIL $1: expected '$3', got '$2'"
        fail=1
    fi
}

check "greets the world by default" "$(greeting)" "hello, world"
check "greets by name" "$(greeting capstan)" "hello, capstan"
exit "$fail"
