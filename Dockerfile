# syntax=docker/dockerfile:1
# totango-destination: build with the Rust toolchain, run on a slim Debian.
#   docker build -t totango-destination .
#   docker run -d -p 8080:8080 -v td-data:/data \
#     -e TD_TOTANGO__SERVICE_ID=SP-1234-01 -e TD_AUTH__WRITE_KEYS=my-write-key \
#     totango-destination
# The server listens on 0.0.0.0 here, so it refuses to start without TD_AUTH__WRITE_KEYS
# (or [[sources]] in a --config file) unless TD_AUTH__ALLOW_OPEN=true.

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# The same build command as the README; gcc for the bundled SQLite comes with the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    cargo build --release --locked

FROM debian:bookworm-slim
# ca-certificates for HTTPS to Totango; curl only for the HEALTHCHECK below.
# Unpinned on purpose: the security updates of the bookworm release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 td \
 && useradd --system --uid 10001 --gid td --home-dir /data --no-create-home \
      --shell /usr/sbin/nologin td \
 && mkdir -p /data /etc/totango-destination \
 && chown td:td /data
COPY --from=builder /src/target/release/totango-destination /usr/local/bin/totango-destination
# The documented example (equal to the defaults); mount your own file and pass --config.
COPY config/totango-destination.toml /etc/totango-destination/totango-destination.toml
# Owned by td before it is declared a volume, so a new named volume starts writable.
VOLUME ["/data"]
WORKDIR /data
USER 10001:10001
ENV TD_LISTEN=0.0.0.0:8080 \
    TD_STORAGE__URL=sqlite:///data/totango-destination.db
EXPOSE 8080
# /healthz answers while the process is alive; it checks port 8080, so keep TD_LISTEN's port.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:8080/healthz"]
# SIGTERM (docker stop) stops accepting, finishes open requests and in-flight deliveries;
# undelivered messages stay in /data for the next start.
ENTRYPOINT ["/usr/local/bin/totango-destination"]
CMD ["serve"]
