# The load simulators of the compose stack: hey, from Debian's packages.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN command -v hey >/dev/null \
 || (apt-get update \
     && apt-get install -y --no-install-recommends hey \
     && rm -rf /var/lib/apt/lists/*)
ENTRYPOINT ["hey"]
