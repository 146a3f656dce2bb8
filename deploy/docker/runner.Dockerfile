# The runner image: `sluice-runner` and the tools its jobs use (bash, coreutils, grep) on
# Debian slim. It runs as root *inside its gVisor sandbox* (runtimeClassName: gvisor): the
# sidecar drops every task to a per-slot uid and gives tools namespaces of their own, which
# needs root and SETUID/SETGID/SYS_ADMIN there (deploy/README.md). Tools never run as root.
# Build from the repository root: docker build -f deploy/docker/runner.Dockerfile -t sluice-runner:dev .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p sluice-runner --bin sluice-runner

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends bash coreutils grep ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/sluice-runner /usr/local/bin/sluice-runner
# Root in the sandbox only; see the header.
USER 0:0
WORKDIR /workspace
ENTRYPOINT ["/usr/local/bin/sluice-runner"]
