# The container image: the Debian package of packaging/build-deb.sh, installed on a slim
# Debian, run by a user without privileges.
#   docker build -t amqproxy .
#   docker run --rm -p 127.0.0.1:5673:5673 --stop-timeout 45 amqproxy amqp://broker-host:5672
# packaging/check-image.sh runs these same instructions in debootstrap root file systems (no
# container engine needed) and checks the result.

# Build: the .deb, with the compiled frame scanner (its tools stay in this stage).
FROM debian:bookworm-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv python3.11-dev gcc libc6-dev dpkg-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY src ./src
COPY packaging ./packaging
RUN bash packaging/build-deb.sh /out

# Run: the package and its dependencies (python3.11; ca-certificates for amqps:// brokers).
FROM debian:bookworm-slim
COPY --from=build /out/amqproxy_*.deb /tmp/deb/
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates /tmp/deb/amqproxy_*.deb \
    && rm -rf /var/lib/apt/lists/* /tmp/deb \
    && groupadd --system --gid 10001 amqproxy \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin amqproxy
# In a container the proxy must listen beyond loopback for -p to reach it. An environment
# value: -l or LISTEN_ADDRESS given to docker run still wins (it beats a -c file's address).
ENV LISTEN_ADDRESS=0.0.0.0
# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001
EXPOSE 5673 15673
# /readyz: 200 when the proxy serves, 503 while it drains, is paused or cannot reach the broker
# (/healthz is liveness only: 200 whenever the process answers HTTP).
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/opt/amqproxy/bin/python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % (os.environ.get('HTTP_PORT') or 15673), timeout=4)"]
# SIGTERM drains for up to 30 s by default: give docker stop --stop-timeout 45 (or
# terminationGracePeriodSeconds) so that the outbox is delivered before SIGKILL.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/amqproxy"]
