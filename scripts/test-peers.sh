#!/usr/bin/env bash
# Install the external programs the test suite drives (real peers nobody here wrote).
# Each one is checked by name; a missing one is installed from Debian, or this fails.
set -euo pipefail
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
# command-name:debian-package
PEERS=(swaks:swaks postconf:postfix smtp-source:postfix)
missing=()
for peer in "${PEERS[@]}"; do
    command -v "${peer%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${peer%%:*}" ] \
        || missing+=("${peer#*:}")
done
# swaks speaks TLS only with Perl's Net::SSLeay (a Debian "recommends").
perl -MNet::SSLeay -e1 2>/dev/null || missing+=(libnet-ssleay-perl)
if [ ${#missing[@]} -gt 0 ]; then
    echo "test-peers: installing ${missing[*]} from Debian"
    # Postfix without a system mail set-up: the tests run private instances.
    echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $(printf "%s\n" "${missing[@]}" | sort -u)
fi
for peer in "${PEERS[@]}"; do
    command -v "${peer%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${peer%%:*}" ] \
        || { echo "test-peers: ${peer%%:*} is still missing" >&2; exit 1; }
done
perl -MNet::SSLeay -e1 2>/dev/null \
    || { echo "test-peers: Perl's Net::SSLeay (for swaks --tls) is still missing" >&2; exit 1; }
echo "test-peers: ${PEERS[*]%%:*} ready"
