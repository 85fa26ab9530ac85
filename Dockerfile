# One image for both compose services: docket-registry (with ctorrent) and the opentracker tracker.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ctorrent opentracker ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY docket ./docket
RUN python3 -m venv /opt/docket && /opt/docket/bin/pip install --no-cache-dir . && rm -rf /src
ENV PATH=/opt/docket/bin:$PATH
WORKDIR /
VOLUME /var/local/docket
EXPOSE 8000 6969
CMD ["docket-registry"]
