# The Servo image: `servo serve` (gateway, KServe model server) and `servo up` (controller).
# Not built or run in this repository's tests (no container runtime here); the chart's
# tests check the manifests that use it.
FROM python:3.12.8-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY serving/ serving/
COPY monitors/ monitors/
COPY registry/ registry/
COPY retrain/ retrain/
COPY servo/ servo/
RUN pip install . && rm -rf /src

# The chart's pods run as this uid/gid (runAsUser 10001) with a read-only root file system;
# /var/lib/servo and /tmp are volumes there.
RUN groupadd --system --gid 10001 servo \
    && useradd --system --uid 10001 --gid servo --home-dir /var/lib/servo --create-home servo
USER 10001:10001
WORKDIR /var/lib/servo

EXPOSE 8080 8081 8082
ENTRYPOINT ["servo"]
CMD ["--help"]
