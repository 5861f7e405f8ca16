# Keel on a GPU cluster: Ray 2.60.0, Python 3.11, CUDA, as pinned by Ray's own image.
#   docker build -t ghcr.io/your-org/keel:0.1.0 . && docker push ghcr.io/your-org/keel:0.1.0
# then set docker.image in cluster.yaml to that tag.
FROM rayproject/ray:2.60.0-py311-gpu

# Ray's images run as the unprivileged user `ray`; stay that way.
USER ray
WORKDIR /home/ray/keel

# Ray and every package it depends on stay at the image's versions: installing torch and Keel cannot move
# them (docker/ray_constraints.py writes the pins).
COPY --chown=ray:users docker/ray_constraints.py /home/ray/
RUN python /home/ray/ray_constraints.py > /home/ray/ray-constraints.txt

# torch first, pinned, in its own layer: the CUDA build from PyPI (several GB) is downloaded once, not on
# every code change.
RUN pip install --no-cache-dir -c /home/ray/ray-constraints.txt "torch==2.13.0"

# Keel's dependencies next, from pyproject.toml alone (a placeholder package): cached until it changes.
COPY --chown=ray:users pyproject.toml README.md ./
RUN mkdir orchestrator && touch orchestrator/__init__.py \
    && pip install --no-cache-dir -c /home/ray/ray-constraints.txt -e . \
    && rm -r orchestrator

# The code last: an edit rebuilds only these layers (the editable install points here).
COPY --chown=ray:users orchestrator ./orchestrator
COPY --chown=ray:users jobs ./jobs
COPY --chown=ray:users examples ./examples

# The digits data in the image (from scikit-learn, no download): every pod has it at the same path, so
# the shipped jobs run on a cluster as they are (k8s/rayjob.yaml). Also the smoke check: the CLI runs.
RUN keel data make digits --out data/digits > /dev/null
