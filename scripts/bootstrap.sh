#!/usr/bin/env bash
# Make sure a fresh Debian machine can build LightMail's virtualenv: python3 with
# venv and pip, and a C compiler for any wheel that has to be built.
set -euo pipefail
need=()
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv python3-pip)
command -v gcc >/dev/null || need+=(gcc python3-dev libffi-dev)
command -v openssl >/dev/null || need+=(openssl)
if [ ${#need[@]} -gt 0 ]; then
    echo "bootstrap: installing ${need[*]} from Debian"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi
