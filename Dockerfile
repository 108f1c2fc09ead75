# The image the pipeline components run in, in two variants: CPU for every task, CUDA for train (the
# task with a GPU): mammoseg and its locked dependencies in /opt/venv, `mammoseg` on the PATH, a
# non-root user (uid/gid 1000, which the pipeline states as each container's securityContext); the CPU
# variant also has the kubeflow SDK, for the TrainJob launcher (pipelines/trainjob.py). No kfp: the components are container components (KFP's
# launcher is a Go binary the cluster injects), so the `pipeline` extra stays on the machine that
# compiles and submits; `mammoseg-pipeline` in the image says so in one line. Built offline by
# scripts/build_image.sh (read it first):
#
#   BASE        a base with Debian's python3.11 and python3-venv. Default: the debootstrapped
#               mammoseg-debian:bookworm the script imports (CPU). For GPU nodes a CUDA runtime base
#               with the same python works too; with the default base the CUDA runtime comes from the
#               nvidia-*-cu12 wheels that PyPI's CUDA torch pulls, and the node's driver is injected by
#               the NVIDIA container toolkit (the device plugin sets NVIDIA_VISIBLE_DEVICES per pod).
#   VARIANT     cpu | cuda: which wheelhouse the script prepared (CPU torch + onnxruntime, or CUDA
#               torch + onnxruntime-gpu); recorded in the image as MAMMOSEG_IMAGE_VARIANT.
#   WHEELHOUSE  build/wheelhouse/<variant>: deps/ (every runtime wheel, the runtime share of the repo's
#               requirements.lock and torch.txt, the torch build) and project/ (the mammoseg wheel).
#
# Cache-friendly: the dependency layer depends only on deps/, so a code change rebuilds the two small
# project layers. Nothing is compiled: every package arrives as a wheel, so no compiler, headers or
# package index ever enter the image (it builds with --network none). Works with the legacy builder
# and with BuildKit (no RUN --mount, no secrets needed).
ARG BASE=mammoseg-debian:bookworm

# --- stage 1: the dependency venv, installed from the wheelhouse ------------------------------------------
# Dropped after the install: C++ headers of torch and the packages' own test suites (~230 MB, never
# imported at run time; the module `jinja2/tests.py` is a file and stays).
FROM ${BASE} AS deps
ARG WHEELHOUSE=build/wheelhouse/cpu
COPY ${WHEELHOUSE}/deps/ /wheels/
# requirements.lock: the runtime share of the repo's lock, installed as locked (--no-deps: nothing is
# resolved); torch.txt: the variant's torch build, then, with the CUDA build's own nvidia-* wheels; pip
# check proves the two add up to a consistent environment.
RUN python3 -m venv /opt/venv \
 && pip="/opt/venv/bin/pip --no-cache-dir --disable-pip-version-check" \
 && $pip install --no-index --find-links /wheels --no-deps -r /wheels/requirements.lock \
 && $pip install --no-index --find-links /wheels -r /wheels/torch.txt \
 && $pip check \
 && cp /wheels/requirements.lock /wheels/torch.txt /opt/venv/ \
 && site=/opt/venv/lib/python3.11/site-packages \
 && rm -rf "$site/torch/include" \
 && find "$site" -depth -type d -name tests -exec rm -rf {} +

# --- stage 2: the runtime image ---------------------------------------------------------------------------
FROM ${BASE}
ARG VARIANT=cpu
ARG WHEELHOUSE=build/wheelhouse/cpu
# Numeric uid/gid so Kubernetes' runAsNonRoot can check them; the home is writable scratch space.
RUN echo 'mammoseg:x:1000:1000:mammoseg:/home/mammoseg:/bin/sh' >> /etc/passwd \
 && echo 'mammoseg:x:1000:' >> /etc/group \
 && mkdir -p /home/mammoseg && chown 1000:1000 /home/mammoseg
# Only the venv crosses over from stage 1 (the wheels stay behind).
COPY --from=deps /opt/venv /opt/venv
# The code: small layers after the big one.
COPY ${WHEELHOUSE}/project/ /tmp/project/
RUN /opt/venv/bin/pip install --no-index --no-deps --no-cache-dir --disable-pip-version-check /tmp/project/*.whl \
 && rm -rf /tmp/project
# The params.yaml the image was built with: the defaults when a stage gets no --params.
COPY params.yaml /opt/mammoseg/params.yaml
ENV PATH=/opt/venv/bin:$PATH \
    MAMMOSEG_PARAMS=/opt/mammoseg/params.yaml \
    MAMMOSEG_IMAGE_VARIANT=${VARIANT} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/mammoseg \
    MPLCONFIGDIR=/tmp/matplotlib \
    GIT_PYTHON_REFRESH=quiet \
    DVC_NO_ANALYTICS=1
USER 1000:1000
WORKDIR /home/mammoseg
CMD ["mammoseg", "--help"]
