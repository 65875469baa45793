# syntax=docker/dockerfile:1
# Build: docker build --build-arg TAGRELAY_GIT_SHA=$(git rev-parse --short HEAD) -t tagrelay .
# Run:   docker run -p 8080:8080 -v tagrelay-data:/var/lib/tagrelay tagrelay
# Your config: add -v ./tagrelay.toml:/etc/tagrelay/tagrelay.toml:ro (it replaces the image's).
FROM rust:1-bookworm AS build
# The build context has no .git (.dockerignore): `tagrelay --version` and the
# tagrelay_build_info metric name the commit given here ("unknown" without it).
ARG TAGRELAY_GIT_SHA=""
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin tagrelay && mkdir -p /out/data

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/tagrelay /usr/local/bin/tagrelay
# The image's defaults live in its config file, not in TAGRELAY__… variables: environment
# variables beat the file, so they would silently override a config you mount.
COPY deploy/container/tagrelay.toml /etc/tagrelay/tagrelay.toml
# distroless has no shell to mkdir/chown: bring an empty data dir owned by the runtime user.
COPY --from=build --chown=65532:65532 /out/data /var/lib/tagrelay
ENV TAGRELAY_CONFIG=/etc/tagrelay/tagrelay.toml
VOLUME ["/var/lib/tagrelay"]
EXPOSE 8080
USER nonroot:nonroot
# distroless has no shell or curl: the binary probes itself, on the public address of the
# config in force (TAGRELAY_CONFIG).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["/usr/local/bin/tagrelay", "healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/tagrelay"]
CMD ["serve"]
