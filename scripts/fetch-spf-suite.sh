#!/usr/bin/env bash
# The RFC 7208 test suite (the openspf project's rfc7208-tests.yml), which
# tests/test_spf_suite.py runs against LightMail's SPF evaluator.  It ships in pyspf's
# source distribution: fetched with pip (pyspf itself is neither installed nor used),
# extracted into a cache directory outside the tree, and checked against the digest
# in tests/rfc7208-tests.yml.sha256, so that the judge is the file that was reviewed.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=2.0.14
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/lightmail/rfc7208"
DIGEST="$PWD/tests/rfc7208-tests.yml.sha256"
check() { (cd "$CACHE" 2>/dev/null && sha256sum --check --status "$DIGEST"); }
if ! check; then
    PYTHON=.venv/bin/python; [ -x "$PYTHON" ] || PYTHON=python3
    work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
    echo "fetch-spf-suite: downloading pyspf $VERSION's source distribution for its test suite"
    "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: --dest "$work" \
        "pyspf==$VERSION"
    tar -xzf "$work/pyspf-$VERSION.tar.gz" -C "$work"
    mkdir -p "$CACHE"
    cp "$work/pyspf-$VERSION/test/rfc7208-tests.yml" \
       "$work/pyspf-$VERSION/test/rfc7208-tests.LICENSE" "$CACHE/"
    check || { echo "fetch-spf-suite: $CACHE/rfc7208-tests.yml does not match $DIGEST" >&2
               exit 1; }
fi
echo "fetch-spf-suite: $CACHE/rfc7208-tests.yml ready"
