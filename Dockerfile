# tensorcost-events: a small runtime image holding the one binary.
#
#   docker build -t tensorcost-events .        (or: podman build -t tensorcost-events .)
#   docker run -p 50051:50051 -p 8080:8080 tensorcost-events
#
# The builder installs Rust from Debian itself (bookworm-security ships
# rustc-web and cargo-web 1.96), so the build needs only debian:bookworm-slim,
# Debian's mirror and the crates registry. deploy/test builds this file and
# tries the image (deploy/README.md).

FROM debian:bookworm-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends rustc-web cargo-web gcc g++ make libc6-dev ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The registry and target folders are build caches (kept between builds on
# the same machine, never in the image). No debug information, symbols
# stripped: the runtime image stays small.
RUN --mount=type=cache,target=/root/.cargo/registry \
    --mount=type=cache,target=/src/target \
    CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=symbols \
    cargo build --release --locked --bin tensorcost-events \
 && cp target/release/tensorcost-events /usr/local/bin/tensorcost-events

FROM debian:bookworm-slim
# CA certificates: the broker calls out over HTTPS (Cognito's JWKS, webhook
# receivers, an OTLP collector).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/tensorcost-events \
      --create-home --shell /usr/sbin/nologin tensorcost
COPY --from=build /usr/local/bin/tensorcost-events /usr/local/bin/tensorcost-events
USER 10001:10001
WORKDIR /var/lib/tensorcost-events
# Both listeners on every interface; kept state (without Redis) under the
# home folder: mount a volume there to keep it across containers.
ENV TC_GRPC_ADDR=0.0.0.0:50051 \
    TC_HTTP_ADDR=0.0.0.0:8080 \
    TC_DATA_DIR=/var/lib/tensorcost-events
EXPOSE 50051 8080
# The binary asks its own /healthz (https when TC_TLS_CERT is set): no curl.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
  CMD ["tensorcost-events", "healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["tensorcost-events"]
CMD ["serve"]
