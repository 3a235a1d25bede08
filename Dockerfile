# One image for every Airflow component of the retraining platform (api-server, scheduler, dag-processor,
# triggerer and the Celery workers of the default and `gpu` queues); docker-compose.yaml builds it.
#
#   docker build -t retrain-airflow:3.3.2 .                                   # CPU torch (default)
#   docker build --build-arg TORCH_VARIANT=cu126 -t retrain-airflow-gpu:3.3.2 .  # CUDA torch, gpu worker
#
# TORCH_VARIANT is the local-version tag of the PyTorch wheel (cpu, cu126, cu128, ...): it must be one the
# PyTorch index publishes for the torch version pinned in requirements.txt. TORCH_INDEX_URL can point at a
# mirror of that index instead.
FROM apache/airflow:3.3.2-python3.11

ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}

# pipefail: a failing command on the left of a pipe must fail the build, not be hidden by the right side.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# RETRAIN_HOME holds run directories, the model cache and reports; compose mounts a volume shared by the
# workers there, because training (gpu queue) and evaluation (default queue) read the same run directory.
ENV RETRAIN_HOME=/opt/airflow/state \
    RETRAIN_USE_CASES_DIR=/opt/airflow/include/use_cases \
    HF_HOME=/opt/airflow/state/huggingface

# 50000 is the official image's `airflow` user (numeric so any host resolves it): the image installs
# Python packages as that user and pip refuses to run as root there.
USER 50000
WORKDIR /opt/airflow

COPY --chown=airflow:0 requirements.txt requirements-nodeps.txt ./

# torch first, from the PyTorch index, as the exact local version (2.13.0+cpu / 2.13.0+cu126): PyPI's
# Linux torch wheel is the CUDA build with several GB of nvidia-* wheels, wrong for CPU and not
# choosable per CUDA version. The version comes from requirements.txt so the image trains with the same
# torch as dev and CI. apache-airflow is pinned in every install, as the image's docs require, so a
# dependency can never up- or downgrade Airflow itself.
RUN torch_version="$(sed -n 's/^torch==\([0-9][0-9.]*\).*/\1/p' requirements.txt)" \
    && if [ -z "${torch_version}" ]; then \
         echo "requirements.txt has no 'torch==X.Y.Z' line: pin torch there, the image installs that version" >&2; \
         exit 1; \
       fi \
    && echo "torch==${torch_version}+${TORCH_VARIANT}" > /opt/airflow/torch-constraint.txt \
    && pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" \
         "apache-airflow==${AIRFLOW_VERSION}" "torch==${torch_version}+${TORCH_VARIANT}"

# The rest, constrained to the torch just installed: requirements.txt says torch==X.Y.Z, which the local
# build X.Y.Z+variant satisfies, and the constraint stops pip from swapping it for PyPI's build.
RUN pip install --no-cache-dir -c /opt/airflow/torch-constraint.txt \
         "apache-airflow==${AIRFLOW_VERSION}" -r requirements.txt \
    && pip install --no-cache-dir --no-deps -r requirements-nodeps.txt

# The project. Editable on purpose: retrain.schemas.use_case finds the repository root (use cases, SQL) relative to
# its own file, so the package must stay at /opt/airflow/include/retrain; editable also means the
# ./include bind mount of docker-compose.yaml replaces the code without a rebuild. RETRAIN_HOME is
# group-writable because compose runs the containers as ${AIRFLOW_UID}:0, often not 50000 but always group 0.
COPY --chown=airflow:0 pyproject.toml ./
COPY --chown=airflow:0 include/ ./include/
RUN pip install --no-cache-dir --no-deps -e . \
    && mkdir -p "${RETRAIN_HOME}" \
    && chmod g+rwx "${RETRAIN_HOME}"

COPY --chown=airflow:0 dags/ ./dags/
COPY --chown=airflow:0 plugins/ ./plugins/
