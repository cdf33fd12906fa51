# DeepISLES BIDS App: `docker run IMAGE bids_dir output_dir participant|group [options]`.
#
#   docker build -t deepisles:0.1.0-cpu .                                   # CPU (default)
#   docker build -t deepisles:0.1.0-cuda --build-arg VARIANT=cuda .         # NVIDIA GPUs (Hopper incl.)
#   docker build --build-arg WEIGHTS_DIR=docker/weights-official ...        # + official DeepISLES weights
#
# Build arguments:
#   BASE_IMAGE        Debian 12 (bookworm) image, default debian:bookworm-slim; any bookworm rootfs
#                     works (tests/container/smoke.sh imports one made with debootstrap).
#   VARIANT           cpu | cuda. cpu: torch 2.13.0+cpu, from a wheel placed in docker/wheels/ when
#                     there is one, else from TORCH_CPU_INDEX. cuda: torch 2.13.0 from PyPI, the build
#                     against CUDA 13.0 (Hopper sm_90 supported; host driver >= 580; untested here),
#                     its CUDA libraries pinned by docker/constraints-cuda.txt.
#   WEIGHTS_DIR       folder inside the build context holding the unpacked official `weights/`
#                     (SEALS/, NVAUTO/, FACTORIZER/); copied to /opt/deepisles/weights with a
#                     SHA256SUMS manifest made at build time. Default: docker/weights (empty).
# SHELL is repeated in each stage (bash with pipefail): OCI-format images do not carry it, so
# podman/buildah need `--format docker` for it to apply at all.
# Dependencies: every Python package is pinned by docker/constraints.txt (regenerate it with
# docker/make_constraints.py); tests/test_container_files.py checks it against pyproject.toml.

ARG BASE_IMAGE=debian:bookworm-slim

# --------------------------------------------------------------------------------------------------
# runtime-base: the interpreter only (Debian's Python 3.11), shared by the builder and the final image
FROM ${BASE_IMAGE} AS runtime-base
SHELL ["/bin/bash", "-euo", "pipefail", "-c"]
ARG DEBIAN_FRONTEND=noninteractive
ENV LANG=C.UTF-8 \
    LC_ALL=C.UTF-8
# Debian packages are not version-pinned: bookworm is a stable release whose versions move only for
# security fixes (an exact pin would break the build at the next point release); the base image is
# the pin (BASE_IMAGE, or the dated debootstrap rootfs of tests/container/smoke.sh).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log

# --------------------------------------------------------------------------------------------------
# builder: a virtual environment in /opt/venv with the pinned closure, then the app itself
FROM runtime-base AS builder
SHELL ["/bin/bash", "-euo", "pipefail", "-c"]
ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# docker/certs/*.crt: extra CA certificates for pip behind a TLS-inspecting proxy (builder only;
# the final image keeps Debian's store). Empty by default.
COPY docker/certs/ /tmp/certs/
RUN { cat /etc/ssl/certs/ca-certificates.crt; find /tmp/certs -name '*.crt' -exec cat {} +; } \
        > /tmp/ca-bundle.crt
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    PIP_CERT=/tmp/ca-bundle.crt
RUN python3 -m venv /opt/venv
COPY docker/constraints.txt docker/constraints-cuda.txt /tmp/docker/
COPY docker/wheels/ /tmp/wheels/
ARG VARIANT=cpu
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
# torch first (the variant decides the build, the constraints file the release), then the app.
# hadolint ignore=SC2086
RUN PIP="/opt/venv/bin/python -m pip"; C="-c /tmp/docker/constraints.txt"; \
    case "${VARIANT}" in \
      cpu) set -- /tmp/wheels/torch-*+cpu-*.whl; \
           if [ -f "$1" ]; then $PIP install $C "$1"; \
           else $PIP install $C --index-url "${TORCH_CPU_INDEX}" \
                    --extra-index-url https://pypi.org/simple "torch==2.13.0+cpu"; fi ;; \
      cuda) $PIP install $C -c /tmp/docker/constraints-cuda.txt torch ;; \
      *) echo "VARIANT must be cpu or cuda, not '${VARIANT}'" >&2; exit 64 ;; \
    esac; \
    /opt/venv/bin/python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
# the app's dependencies (from pyproject.toml alone: this layer stays cached while the code changes)
COPY pyproject.toml /src/
RUN /opt/venv/bin/python -c 'import tomllib; print(*tomllib.load(open("/src/pyproject.toml", "rb"))["project"]["dependencies"], sep="\n")' \
        > /tmp/requirements.txt \
    && /opt/venv/bin/python -m pip install -c /tmp/docker/constraints.txt -r /tmp/requirements.txt \
    && find /opt/venv \( ! -perm -o+r -o -perm -o+w \) ! -type l -exec chmod a+rX,go-w {} +
# then the app itself; --no-build-isolation: the build backend is the pinned setuptools already in
# the venv (nothing downloaded), --no-deps: all installed above (pip check verifies)
COPY README.md /src/
COPY bids_app /src/bids_app
COPY nodes /src/nodes
COPY models /src/models
RUN /opt/venv/bin/python -m pip install --no-build-isolation --no-deps \
        -c /tmp/docker/constraints.txt /src \
    && /opt/venv/bin/python -m pip check \
    && find /opt/venv \( ! -perm -o+r -o -perm -o+w \) ! -type l -exec chmod a+rX,go-w {} +

# official weights (optional): WEIGHTS_DIR's files plus a SHA256SUMS manifest made here
ARG WEIGHTS_DIR=docker/weights
COPY ${WEIGHTS_DIR}/ /opt/deepisles/weights/
WORKDIR /opt/deepisles/weights
RUN rm -f .keep \
    && find . -type f -print0 | sort -z | xargs -0 -r sha256sum > /tmp/SHA256SUMS \
    && mv /tmp/SHA256SUMS SHA256SUMS \
    && find /opt/deepisles \( ! -perm -o+r -o -perm -o+w \) ! -type l -exec chmod a+rX,go-w {} + \
    && echo "official weights: $(grep -c . SHA256SUMS || true) file(s)"

# --------------------------------------------------------------------------------------------------
# app: the image (the `final` stage below, last in this file, is what a plain build produces)
FROM runtime-base AS app
SHELL ["/bin/bash", "-euo", "pipefail", "-c"]
ARG VARIANT=cpu
ARG VERSION=0.1.0
ARG VCS_REF=unknown
ARG SOURCE=https://github.com/deepisles-bids/deepisles-bids
LABEL org.opencontainers.image.title="deepisles-bids" \
      org.opencontainers.image.description="DeepISLES ischemic stroke lesion segmentation from diffusion MRI, as a BIDS App (${VARIANT})" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="deepisles-bids" \
      org.bids-apps.variant="${VARIANT}"
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/deepisles /opt/deepisles
# Nothing writes outside /tmp and the mounted output: caches under /tmp, no network version checks,
# no bytecode writes, TemplateFlow home pre-initialised at a fixed path outside $HOME.
# USER: `--user <uid>` with no passwd entry makes getpass.getuser() (called by monai on import) fail
# unless USER/LOGNAME is set.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NIPYPE_NO_ET=1 \
    MPLCONFIGDIR=/tmp/.cache/matplotlib \
    XDG_CACHE_HOME=/tmp/.cache \
    TEMPLATEFLOW_HOME=/opt/templateflow \
    TEMPLATEFLOW_AUTOUPDATE=0 \
    USER=deepisles \
    DEEPISLES_CONTAINER=docker \
    DEEPISLES_CONTAINER_TAG="deepisles:${VERSION}-${VARIANT}"
# - the app's default official-weights folder (<site-packages>/weights) points at /opt/deepisles/weights;
# - TemplateFlow's stub is created now (read-only at run time; templates would be added here);
# - /data and /out exist as mount points; everything world-readable, nothing world-writable but /tmp
#   (the builder already made /opt/venv and /opt/deepisles so: a chmod here would copy them again,
#   doubling the image; there, only the files that need it are touched, for the same reason).
RUN SITE="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    && ln -s /opt/deepisles/weights "${SITE}/weights" \
    && python3 -W ignore -c "import templateflow.api" \
    && mkdir -p /data /out \
    && chmod -R a+rX,go-w /opt/templateflow /data /out \
    && deepisles --version
WORKDIR /tmp
ENTRYPOINT ["deepisles"]
CMD ["--help"]

# --------------------------------------------------------------------------------------------------
# smoke: `--target smoke` runs the demo (participant + group levels) as a non-root uid at build time.
# After a normal build, `docker build --network none --target smoke .` runs only this step (the rest
# is cached) with no network; podman's chroot isolation refuses --network none, so
# tests/container/smoke.sh runs that build under `unshare --net`, then checks more in a chroot
# (read-only root, no network, uid 4242, the image's own env/entrypoint/workdir).
FROM app AS smoke
SHELL ["/bin/bash", "-euo", "pipefail", "-c"]
USER 4242:4242
RUN DEMO="$(python3 -c 'import bids_app, pathlib; print(pathlib.Path(bids_app.__file__).parent / "data/demo/isles22-sample")')" \
    && deepisles --version \
    && deepisles "${DEMO}" /tmp/demo_out participant -w /tmp/demo_work --nprocs 2 \
    && deepisles "${DEMO}" /tmp/demo_out group \
    && test -s /tmp/demo_out/group_lesions.tsv \
    && find /tmp/demo_out -name '*_label-lesion_mask.nii.gz' | grep -q .

# --------------------------------------------------------------------------------------------------
# final: the default target
FROM app AS final
