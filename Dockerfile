# One image for the whole suite: the command picks the process, for example
# `python -m services.auth`, `python -m services.audit.ingest`, `envoy` or
# `python -m services.common.migrations` (see k8s/base).
FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY constraints.txt k8s/image/requirements.txt ./
RUN /opt/venv/bin/pip install --no-cache-dir \
        --constraint constraints.txt --requirement requirements.txt
COPY pyproject.toml ./
COPY protos ./protos
COPY services ./services
# The generated API package goes to /app/build/python, found through a
# .pth file, and Envoy's descriptor set to /app/build/api_descriptor.pb.
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps . \
    && /opt/venv/bin/python protos/generate.py /app/build \
    && echo /app/build/python \
        > /opt/venv/lib/python3.11/site-packages/arxio-generated.pth \
    && /opt/venv/bin/python -m compileall -q /opt/venv /app/build

FROM python:3.11-slim-bookworm
# A fixed numeric user, so that Kubernetes can check runAsNonRoot.
RUN groupadd --gid 10001 arxio \
    && useradd --uid 10001 --gid 10001 --no-create-home \
        --shell /usr/sbin/nologin arxio
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app/build /app/build
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /app
USER 10001:10001
CMD ["python", "-m", "services.cds"]
