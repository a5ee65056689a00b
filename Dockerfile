# LightMail in a container: `twistd -n lightmail`, as the systemd unit runs it
# (etc/systemd/lightmail.service), as the user lightmail.
#
# Not built by LightMail's tests (the machines they run on have no container
# runtime): tests/test_packaging.py only checks that what it copies exists and that
# it runs the unit's command.  Build and run:
#
#   docker build -t lightmail .
#   docker run -d --name lightmail -p 25:2525 -p 587:5870 -p 993:9930 \
#       -v /srv/lightmail/etc:/etc/lightmail:ro -v /srv/lightmail/state:/var/lib/lightmail \
#       lightmail
#
# /etc/lightmail/lightmail.conf is yours to provide (docs/operations.rst, "Docker"):
# state_dir = /var/lib/lightmail, listeners on 0.0.0.0 (the container's loopback is
# reachable from nowhere else) on ports above 1024, [logging] file = - (docker logs).
FROM debian:bookworm-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --user-group --home-dir /var/lib/lightmail \
               --shell /usr/sbin/nologin lightmail \
    && install -d -o lightmail -g lightmail -m 0750 /var/lib/lightmail /var/log/lightmail \
    && install -d -m 0755 /etc/lightmail

COPY pyproject.toml setup.cfg README.rst /src/
COPY lightmail /src/lightmail
COPY twisted /src/twisted
RUN python3 -m venv /opt/lightmail \
    && /opt/lightmail/bin/pip install --no-cache-dir /src \
    && rm -rf /src

USER lightmail
WORKDIR /var/lib/lightmail
VOLUME ["/var/lib/lightmail", "/var/log/lightmail"]
EXPOSE 2525 5870 4650 1100 9950 1430 9930
# SIGTERM drains the sessions, as under systemd; give it [server] shutdown_timeout.
STOPSIGNAL SIGTERM
CMD ["/opt/lightmail/bin/twistd", "-n", "--pidfile=", "lightmail", "--config", "/etc/lightmail/lightmail.conf"]
