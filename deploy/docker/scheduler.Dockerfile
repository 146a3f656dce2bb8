# The scheduler image: `sluice` on distroless, as uid 65532 (Pod Security `restricted`).
# Build from the repository root: docker build -f deploy/docker/scheduler.Dockerfile -t sluice:dev .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p sluice-cli --bin sluice

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/sluice /usr/local/bin/sluice
USER 65532:65532
EXPOSE 7070 7071
ENTRYPOINT ["/usr/local/bin/sluice"]
CMD ["serve"]
