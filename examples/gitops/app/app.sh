#!/bin/sh
# The sample application: a tiny HTTP-less "service" that prints a greeting.
# Real apps are Go or Rust; this one only needs busybox, so the whole GitOps
# pipeline runs in the test bed's base image.
set -eu

greeting() {
    printf 'hello, %s\n' "${1:-world}"
}

if [ -z "${APP_SOURCE_ONLY:-}" ]; then
    greeting "${NAME:-world}"
fi
