# The M2KT broker: `pip install '.[broker]'` (no torch) on python:3.11-slim, run as a non-root user.
#
#   docker build -t m2kt-broker .
#   docker compose up          # broker + PostgreSQL + MinIO, see docker-compose.yml
#
# Configuration is the M2KT_* variables (broker/settings.py, m2kt.broker.settings) plus the standard AWS_* ones for S3.
# With none set, the broker runs its embedded default (SQLite + blobs under M2KT_DATA_DIR).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# A fixed, numeric, unprivileged user (so orchestrators can check runAsNonRoot).
RUN groupadd --system --gid 10001 m2kt \
    && useradd --system --uid 10001 --gid m2kt --home-dir /var/lib/m2kt --create-home \
       --shell /usr/sbin/nologin m2kt

# Only what the package needs (pyproject reads README.md): the folders the one m2kt namespace maps
# (client/ is m2kt, broker/ m2kt.broker, migrations/ m2kt.migrations, benchmarks/ m2kt.benchmarks); tests
# and docs stay out.
COPY pyproject.toml README.md /src/
COPY client /src/client
COPY broker /src/broker
COPY migrations /src/migrations
COPY benchmarks /src/benchmarks
RUN pip install '/src[broker]' \
    && rm -rf /src \
    && m2kt --help > /dev/null

USER 10001:10001
WORKDIR /var/lib/m2kt
# Only used by the embedded default (no M2KT_DATABASE_URL / M2KT_STORAGE_URL); the compose broker is stateless.
ENV M2KT_DATA_DIR=/var/lib/m2kt

EXPOSE 8000

# Liveness: GET /healthz; readiness (database and storage reachable): GET /readyz. slim has no curl,
# so health checks use Python, e.g. (see docker-compose.yml):
#   python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"
CMD ["m2kt", "broker", "serve", "--host", "0.0.0.0", "--port", "8000", "--migrate"]
