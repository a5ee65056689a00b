#!/usr/bin/env bash
# Install the external programs the test suite drives (real peers nobody here wrote).
# Each one is checked by name; a missing one is installed from Debian, or this fails.
set -euo pipefail
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
# command-name:debian-package; a name starting with / is a file that must be executable
# (Dovecot's protocol services are programs under /usr/lib/dovecot, not commands).
PEERS=(swaks:swaks postconf:postfix smtp-source:postfix
       /usr/sbin/dovecot:dovecot-core /usr/lib/dovecot/lmtp:dovecot-lmtpd
       /usr/lib/dovecot/pop3:dovecot-pop3d /usr/lib/dovecot/imap:dovecot-imapd
       getmail:getmail6 fetchmail:fetchmail mbsync:isync mutt:mutt tmux:tmux opendkim-testmsg:opendkim-tools
       gsasl:gsasl promtool:prometheus ssh:openssh-client ssh-keygen:openssh-client
       slapd:slapd ldapadd:ldap-utils slappasswd:slapd)
have() {
    case "$1" in
        /*) [ -x "$1" ] ;;
        *) command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] ;;
    esac
}
missing=()
for peer in "${PEERS[@]}"; do
    have "${peer%%:*}" || missing+=("${peer#*:}")
done
# swaks speaks TLS only with Perl's Net::SSLeay (a Debian "recommends").
perl -MNet::SSLeay -e1 2>/dev/null || missing+=(libnet-ssleay-perl)
if [ ${#missing[@]} -gt 0 ]; then
    echo "test-peers: installing ${missing[*]} from Debian"
    # Postfix without a system mail set-up: the tests run private instances.
    echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
    # slapd without a system directory: the tests run private ones with their own
    # configuration and DIT.
    echo "slapd slapd/no_configuration boolean true" | $SUDO debconf-set-selections
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $(printf "%s\n" "${missing[@]}" | sort -u)
    # Dovecot's package starts a system instance (IMAP 143, POP3 110) where an init
    # system lets it: the tests and benchmarks run private instances on free ports, so
    # stop that one and keep it from coming back at boot.
    if printf "%s\n" "${missing[@]}" | grep -q '^dovecot-core$'; then
        if command -v systemctl >/dev/null 2>&1; then
            $SUDO systemctl disable dovecot.service dovecot.socket >/dev/null 2>&1 || true
        fi
        if [ -d /run/systemd/system ]; then
            $SUDO systemctl stop dovecot.service dovecot.socket >/dev/null 2>&1 || true
        else
            $SUDO service dovecot stop >/dev/null 2>&1 || true
            $SUDO update-rc.d dovecot disable >/dev/null 2>&1 || true
        fi
        if [ -s /run/dovecot/master.pid ] && kill -0 "$(cat /run/dovecot/master.pid)" 2>/dev/null; then
            echo "test-peers: the system Dovecot is still running (pid $(cat /run/dovecot/master.pid))" >&2
            exit 1
        fi
    fi
    # Debian's prometheus package starts a Prometheus server (port 9090) where an init
    # system lets it: the tests need only its promtool, so stop and disable the server.
    if printf "%s\n" "${missing[@]}" | grep -q '^prometheus$'; then
        if command -v systemctl >/dev/null 2>&1; then
            $SUDO systemctl disable prometheus.service >/dev/null 2>&1 || true
        fi
        if [ -d /run/systemd/system ]; then
            $SUDO systemctl stop prometheus.service >/dev/null 2>&1 || true
        else
            $SUDO service prometheus stop >/dev/null 2>&1 || true
            $SUDO update-rc.d prometheus disable >/dev/null 2>&1 || true
        fi
    fi
    # slapd's package, likewise, starts a system instance (port 389) where it can.
    if printf "%s\n" "${missing[@]}" | grep -q '^slapd$'; then
        if command -v systemctl >/dev/null 2>&1; then
            $SUDO systemctl disable slapd.service >/dev/null 2>&1 || true
        fi
        if [ -d /run/systemd/system ]; then
            $SUDO systemctl stop slapd.service >/dev/null 2>&1 || true
        else
            $SUDO service slapd stop >/dev/null 2>&1 || true
            $SUDO update-rc.d slapd disable >/dev/null 2>&1 || true
        fi
        if pgrep -x slapd >/dev/null 2>&1 && [ -s /run/slapd/slapd.pid ] \
                && kill -0 "$(cat /run/slapd/slapd.pid)" 2>/dev/null; then
            echo "test-peers: the system slapd is still running (pid $(cat /run/slapd/slapd.pid))" >&2
            exit 1
        fi
    fi
fi
for peer in "${PEERS[@]}"; do
    have "${peer%%:*}" || { echo "test-peers: ${peer%%:*} is still missing" >&2; exit 1; }
done
perl -MNet::SSLeay -e1 2>/dev/null \
    || { echo "test-peers: Perl's Net::SSLeay (for swaks --tls) is still missing" >&2; exit 1; }
echo "test-peers: ${PEERS[*]%%:*} ready"
