# One image for every Epoxi service; the compose file picks the command.
FROM python:3.11-slim
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
