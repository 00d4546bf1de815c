# genauth-monitor container image (docs/operations.md, "Container").
#
#   docker build -t genauth-monitor .
#   docker run -d --name genauth-monitor -p 9464:9464 \
#     -v "$PWD/genauth-monitor.toml:/etc/genauth-monitor/genauth-monitor.toml:ro" \
#     -v genauth-monitor-state:/var/lib/genauth-monitor \
#     --env-file genauth-monitor.env genauth-monitor
#
# The configuration must listen on 0.0.0.0:9464 (the health check and EXPOSE use that port) and
# keep SQLite under /var/lib/genauth-monitor, e.g.
#   url = "sqlite:////var/lib/genauth-monitor/genauth-monitor.db"
# Both stages must use the same base image: the virtual environment refers to its Python.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/genauth-monitor
WORKDIR /src
# The wheel packages the Alembic migrations (monitor/_migrations) and the web view's templates
# and stylesheet (monitor/web), so only these are needed; the check below fails the build if not.
COPY pyproject.toml README.md ./
COPY monitor ./monitor
COPY migrations ./migrations
# With the PostgreSQL driver, so one image serves both storage backends.
RUN /opt/genauth-monitor/bin/pip install --no-cache-dir ".[postgres]" \
    && /opt/genauth-monitor/bin/python -I -c "import monitor.storage.engine as e; e.migrations_dir()" \
    && /opt/genauth-monitor/bin/python -I -c "from importlib.resources import files; \
web = files('monitor.web'); assert web.joinpath('templates/base.html').is_file(); \
assert web.joinpath('static/style.css').is_file()"

FROM ${PYTHON_IMAGE}
ARG UID=10001
ARG GID=10001
LABEL org.opencontainers.image.title="genauth-monitor" \
      org.opencontainers.image.description="Configuration-drift monitor for GenAuth email provider settings" \
      org.opencontainers.image.source="https://github.com/genauth-monitor/genauth-monitor" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid "${GID}" genauth-monitor \
    && useradd --system --uid "${UID}" --gid genauth-monitor --no-create-home \
        --home-dir /var/lib/genauth-monitor --shell /usr/sbin/nologin genauth-monitor \
    && install -d -o genauth-monitor -g genauth-monitor -m 0700 /var/lib/genauth-monitor \
    && install -d -m 0755 /etc/genauth-monitor
COPY --from=build /opt/genauth-monitor /opt/genauth-monitor
ENV PATH=/opt/genauth-monitor/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GENAUTH_MONITOR_CONFIG=/etc/genauth-monitor/genauth-monitor.toml
WORKDIR /var/lib/genauth-monitor
VOLUME ["/var/lib/genauth-monitor"]
USER ${UID}:${GID}
EXPOSE 9464
# slim has no curl: ask /healthz with the image's Python.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9464/healthz', timeout=4).status == 200 else 1)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["genauth-monitor"]
CMD ["run", "-c", "/etc/genauth-monitor/genauth-monitor.toml"]
