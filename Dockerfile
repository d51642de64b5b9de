# For people who build with Docker. Without Docker, ci/build-image.sh makes the same image.
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends protobuf-compiler && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY src ./src
RUN cargo build --release && cp target/release/peerd /peerd

# glibc and libgcc, nothing else: peerd needs no shell and no CA bundle.
FROM gcr.io/distroless/cc-debian12
COPY --from=build /peerd /peerd
ENTRYPOINT ["/peerd"]
CMD ["run"]
