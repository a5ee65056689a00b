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
       slapd:slapd ldapadd:ldap-utils slappasswd:slapd logrotate:logrotate
       systemd-analyze:systemd opendkim:opendkim
       clamd:clamav-daemon clamav-milter:clamav-milter rspamd:rspamd redis-server:redis-server
       spamd:spamd sa-learn:spamassassin postsrsd:postsrsd haproxy:haproxy)
have() {
    case "$1" in
        /*) [ -x "$1" ] ;;
        *) command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] ;;
    esac
}
# stop_system_service NAME EXTRA_UNIT PIDFILE: stop and disable a service a package
# started; fail if its pid file still names a live process.
stop_system_service() {
    if command -v systemctl >/dev/null 2>&1; then
        $SUDO systemctl disable "$1.service" $2 >/dev/null 2>&1 || true
    fi
    if [ -d /run/systemd/system ]; then
        $SUDO systemctl stop "$1.service" $2 >/dev/null 2>&1 || true
    else
        $SUDO service "$1" stop >/dev/null 2>&1 || true
        $SUDO update-rc.d "$1" disable >/dev/null 2>&1 || true
    fi
    if [ -n "$3" ] && [ -s "$3" ] && kill -0 "$(cat "$3")" 2>/dev/null; then
        echo "test-peers: the system $1 is still running (pid $(cat "$3"))" >&2
        exit 1
    fi
}
missing=()
for peer in "${PEERS[@]}"; do
    have "${peer%%:*}" || missing+=("${peer#*:}")
done
# swaks speaks TLS only with Perl's Net::SSLeay (a Debian "recommends").
perl -MNet::SSLeay -e1 2>/dev/null || missing+=(libnet-ssleay-perl)
# A milter on Sendmail's libmilter (tests/libmilter_edits.py): pymilter for Debian's
# python3, a module rather than a command.
/usr/bin/python3 -c "import Milter" 2>/dev/null || missing+=(python3-milter)
if [ ${#missing[@]} -gt 0 ]; then
    echo "test-peers: installing ${missing[*]} from Debian"
    # Postfix without a system mail set-up: the tests run private instances.
    echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
    # slapd without a system directory: the tests run private ones with their own
    # configuration and DIT.
    echo "slapd slapd/no_configuration boolean true" | $SUDO debconf-set-selections
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $(printf "%s\n" "${missing[@]}" | sort -u)
    # Dovecot's, slapd's and prometheus' packages start system instances (IMAP 143,
    # LDAP 389, Prometheus 9090) where an init system lets them: the tests and
    # benchmarks run private instances on free ports (and need only promtool), so stop
    # those and keep them from coming back at boot.
    installed() { printf "%s\n" "${missing[@]}" | grep -q "^$1\$"; }
    installed dovecot-core && stop_system_service dovecot dovecot.socket /run/dovecot/master.pid
    installed slapd && stop_system_service slapd "" /run/slapd/slapd.pid
    installed prometheus && stop_system_service prometheus "" ""
    # OpenDKIM's package starts a system milter where it can: the tests run their own.
    installed opendkim && stop_system_service opendkim "" /run/opendkim/opendkim.pid
    # postsrsd's package starts a system daemon (ports 10001/10002): the SRS tests
    # run private ones on free ports.
    installed postsrsd && stop_system_service postsrsd "" ""
    # The scanners' packages start system daemons too (clamd and freshclam, which
    # would download signatures; rspamd; spamd): the tests run private ones.
    installed clamav-daemon && stop_system_service clamav-daemon "" "" \
        && stop_system_service clamav-freshclam "" ""
    # (clamav-milter: bench/smtp.py --scanners runs a private one for Postfix.)
    installed clamav-milter && stop_system_service clamav-milter "" ""
    installed rspamd && stop_system_service rspamd "" ""
    installed spamd && stop_system_service spamd "" ""
    # HAProxy's package starts a system proxy: the PROXY protocol tests run private
    # ones with generated configs on free ports.
    installed haproxy && stop_system_service haproxy "" /run/haproxy.pid
fi
for peer in "${PEERS[@]}"; do
    have "${peer%%:*}" || { echo "test-peers: ${peer%%:*} is still missing" >&2; exit 1; }
done
perl -MNet::SSLeay -e1 2>/dev/null \
    || { echo "test-peers: Perl's Net::SSLeay (for swaks --tls) is still missing" >&2; exit 1; }
/usr/bin/python3 -c "import Milter" 2>/dev/null \
    || { echo "test-peers: python3-milter (libmilter for Debian's python3) is still missing" >&2; exit 1; }
echo "test-peers: ${PEERS[*]%%:*} ready"
# Test data fetched rather than installed: the RFC 7208 (SPF) test suite.
"$(dirname "$0")/fetch-spf-suite.sh"
