# Keel on a GPU cluster: Ray 2.60.0, Python 3.11, CUDA, as pinned by Ray's own image.
#   docker build -t ghcr.io/your-org/keel:0.1.0 . && docker push ghcr.io/your-org/keel:0.1.0
# then set docker.image in cluster.yaml to that tag.
FROM rayproject/ray:2.60.0-py311-gpu

# Ray's images run as the unprivileged user `ray`; stay that way.
USER ray
WORKDIR /home/ray/keel

# Dependencies first (cached layer): CUDA torch from PyPI, Ray extras already matching the base image.
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users orchestrator ./orchestrator
COPY --chown=ray:users jobs ./jobs
RUN pip install --no-cache-dir "torch>=2.6,<3" && pip install --no-cache-dir -e .

# Smoke check: the CLI imports and runs.
RUN keel --help > /dev/null
