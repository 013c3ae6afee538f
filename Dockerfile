# The worker (and the `orchestrator` command line) with Apptainer from its official release
# packages. Used by compose.yaml; build with `docker build -t apptainer-orchestrator .`.

FROM rust:1.88-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked \
        -p apptainer-orchestrator-worker -p apptainer-orchestrator-producer

FROM debian:bookworm-slim
# The .deb of an Apptainer release on GitHub, for this image's architecture.
ARG APPTAINER_VERSION=1.4.5
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends ca-certificates curl; \
    arch="$(dpkg --print-architecture)"; \
    curl -fsSL -o /tmp/apptainer.deb \
        "https://github.com/apptainer/apptainer/releases/download/v${APPTAINER_VERSION}/apptainer_${APPTAINER_VERSION}_${arch}.deb"; \
    apt-get install -y --no-install-recommends /tmp/apptainer.deb; \
    rm /tmp/apptainer.deb; \
    # curl stays: compose.yaml's health check asks the worker's /readyz with it.
    rm -rf /var/lib/apt/lists/*; \
    apptainer --version
COPY --from=build /src/target/release/orchestrator-worker /src/target/release/orchestrator /usr/local/bin/
ENV ORCHESTRATOR_DATA_DIR=/var/lib/apptainer-orchestrator
VOLUME /var/lib/apptainer-orchestrator
ENTRYPOINT ["orchestrator-worker"]
