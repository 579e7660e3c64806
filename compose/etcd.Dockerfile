# etcd from Debian's packages (etcd-server, etcdctl), for the compose stack.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN command -v etcd >/dev/null \
 || (apt-get update \
     && apt-get install -y --no-install-recommends etcd-server etcd-client \
     && rm -rf /var/lib/apt/lists/*)
EXPOSE 2379 2380
ENTRYPOINT ["etcd"]
