# One image for every Epoxi service; the compose file picks the command. Its healthchecks run
# `python -m epoxi.runtime.probe HOST:PORT` (a gRPC health check honouring EPOXI_TLS_*), since
# the image has no grpcurl. Certificates and tokens are never in the image: docker-compose.yml
# mounts them from secrets/ (docker secrets) at run time.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY protos protos
COPY epoxi epoxi
COPY services services
COPY gateway gateway
COPY devmesh devmesh
COPY cli cli
RUN pip install --no-cache-dir .
STOPSIGNAL SIGTERM
ENTRYPOINT []
