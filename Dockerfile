# syntax=docker/dockerfile:1
# Build: docker build -t tagrelay .
# Run:   docker run -p 8080:8080 -v tagrelay-data:/var/lib/tagrelay tagrelay
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin tagrelay && mkdir -p /out/data

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/tagrelay /usr/local/bin/tagrelay
COPY config/tagrelay.toml /etc/tagrelay/tagrelay.toml
# distroless has no shell to mkdir/chown: bring an empty data dir owned by the runtime user.
COPY --from=build --chown=65532:65532 /out/data /var/lib/tagrelay
# The public listener must be reachable from outside the container; the admin listener stays
# on loopback unless you set TAGRELAY__SERVER__ADMIN_LISTEN and an admin token.
ENV TAGRELAY_CONFIG=/etc/tagrelay/tagrelay.toml \
    TAGRELAY__SERVER__LISTEN=0.0.0.0:8080 \
    TAGRELAY__OUTBOX__PATH=/var/lib/tagrelay/outbox \
    TAGRELAY__SERVER__LOG_FORMAT=json
VOLUME ["/var/lib/tagrelay"]
EXPOSE 8080
USER nonroot:nonroot
# distroless has no shell or curl: the binary probes itself.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["/usr/local/bin/tagrelay", "healthcheck", "--url", "http://127.0.0.1:8080/healthz"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/tagrelay"]
CMD ["serve"]
