# syntax=docker/dockerfile:1
# audgate's container image: the one binary on a distroless base (glibc, CA certificates,
# tzdata, no shell), running as the unprivileged user 65532.
#
#   docker build -t audgate:dev .
#   docker run --rm -v "$PWD/config:/etc/audgate:ro" -p 9191:9191 -p 9901:9901 audgate:dev
#   (config/audgate.yaml: your config; a mounted directory, not a file, so edits reload)
#
# The Kubernetes manifests (deploy/) mount the config at /etc/audgate and run it read-only.
# CI lints this file with hadolint and checks its structure (tests/deploy.rs), and checks that
# the audgate binary needs no shared library beyond what the runtime base ships.

# The toolchain CI builds with (>= Cargo.toml's rust-version). Debian 12 on both sides, so
# the binary's glibc matches the runtime's.
ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY src ./src
COPY crates ./crates
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin audgate \
    && install -D -m 0755 target/release/audgate /out/audgate

# distroless/cc: glibc and libgcc for the binary (aws-lc links them), CA certificates for
# HTTPS to the issuers; `nonroot` runs as 65532:65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/audgate /usr/local/bin/audgate
USER 65532:65532
# gRPC ext_authz, HTTP authorization endpoint, admin (/metrics, /healthz, /readyz)
EXPOSE 9191 9192 9901
ENTRYPOINT ["/usr/local/bin/audgate"]
CMD ["serve", "--config", "/etc/audgate/audgate.yaml"]
