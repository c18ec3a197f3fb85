# HAProxy for compose.yaml, from Debian's package (2.6); its configuration,
# deploy/haproxy/haproxy.cfg, is mounted at run time.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends haproxy \
 && rm -rf /var/lib/apt/lists/*
USER haproxy
EXPOSE 8080 50051
CMD ["haproxy", "-db", "-f", "/etc/haproxy/haproxy.cfg"]
