# Airflow 3 image (pip, as the official image expects: it keeps its own user install) with the fashion-tagging package and its locked dependencies.
# The Airflow version pinned in uv.lock is the base image's, so the lock installs on top unchanged.
FROM apache/airflow:3.3.2-python3.11

# Empty: CPU TensorFlow from the lock. The GPU worker builds with "tensorflow[and-cuda]==2.21.*".
ARG TENSORFLOW_PACKAGE=""

USER airflow
WORKDIR /opt/fashion-tagging
RUN pip install --no-cache-dir "uv>=0.8"

# Dependencies first (cached layer), from the lock file exactly.
COPY --chown=airflow:0 pyproject.toml uv.lock ./
RUN uv export --frozen --no-hashes --no-emit-project --no-dev --format requirements-txt -o /tmp/requirements.txt \
 && pip install --no-cache-dir "apache-airflow==3.3.2" -r /tmp/requirements.txt \
 && if [ -n "${TENSORFLOW_PACKAGE}" ]; then \
      pip uninstall -y tensorflow-cpu && pip install --no-cache-dir "${TENSORFLOW_PACKAGE}"; \
    fi

# Then the project itself (no dependency resolution: they are all installed above).
COPY --chown=airflow:0 README.md ./
COPY --chown=airflow:0 fashion_tagging ./fashion_tagging
RUN pip install --no-cache-dir --no-deps .

COPY --chown=airflow:0 dags /opt/airflow/dags
COPY --chown=airflow:0 plugins /opt/airflow/plugins
WORKDIR /opt/airflow
