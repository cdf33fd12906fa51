#!/usr/bin/env bash
# Container smoke test: build the image from a local Debian rootfs with podman, then run the demo
# (participant + group levels) in the image's filesystem with no network, as uid 4242, on a read-only
# root with only /tmp (tmpfs) and the output folder writable. Too slow for CI (cold: ~10 min); see
# tests/container/README.md. Needs root (debootstrap, podman, mount namespaces).
#
#   tests/container/smoke.sh [--variant cpu|cuda] [--skip-build] [--no-cache] [--stage] [--keep]
#
#   --variant      build argument VARIANT (default cpu; cuda builds a ~5 GB image and runs on the CPU)
#   --skip-build   reuse the image already tagged $IMAGE
#   --no-cache     rebuild every layer (cold build time)
#   --stage        also build the Dockerfile's `smoke` target (its demo run, uid 4242) with no network
#   --keep         keep the work folder ($SMOKE_WORK) with the demo outputs
#   --weights DIR  bake DIR in as the official weights (WEIGHTS_DIR build argument) and check the
#                  image's /opt/deepisles/weights/SHA256SUMS against DIR
# Environment: SMOKE_WORK (default /tmp/deepisles-smoke), IMAGE (default deepisles:smoke-<variant>),
# BASE_IMAGE (default localhost/deepisles-base:bookworm, made with debootstrap when missing),
# DEBIAN_MIRROR (default http://deb.debian.org/debian), TORCH_WHEEL (a torch-2.13.0+cpu wheel to put
# in docker/wheels/ of the build context; default: the one under /opt/wheels when present), EXTRA_CA
# (CA bundle pip trusts during the build; default $PIP_CERT or /etc/ssl/certs/ca-certificates.crt).
set -euo pipefail

REPO="$(cd "$(dirname "$0")/../.." && pwd)"
VARIANT=cpu SKIP_BUILD=0 NO_CACHE=() STAGE=0 KEEP=0 WEIGHTS=""
while [ $# -gt 0 ]; do
    case "$1" in
        --variant) VARIANT="$2"; shift 2 ;;
        --skip-build) SKIP_BUILD=1; shift ;;
        --no-cache) NO_CACHE=(--no-cache); shift ;;
        --stage) STAGE=1; shift ;;
        --keep) KEEP=1; shift ;;
        --weights) WEIGHTS="$(cd "$2" && pwd)"; shift 2 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "unknown option: $1" >&2; exit 64 ;;
    esac
done
WORK="${SMOKE_WORK:-/tmp/deepisles-smoke}"
IMAGE="${IMAGE:-localhost/deepisles:smoke-${VARIANT}}"
BASE_IMAGE="${BASE_IMAGE:-localhost/deepisles-base:bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
RUN_UID=4242
PODMAN=(podman --cgroup-manager cgroupfs)

log() { printf '[smoke %(%H:%M:%S)T] %s\n' -1 "$*"; }
die() { log "FAIL: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (debootstrap, podman and mount namespaces need it)"
if ! command -v podman >/dev/null || ! command -v debootstrap >/dev/null; then
    log "installing podman and debootstrap"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman debootstrap >/dev/null
fi
mkdir -p "$WORK"
MNT="" CTX=""
cleanup() {
    [ -n "$MNT" ] && "${PODMAN[@]}" image unmount "$IMAGE" >/dev/null 2>&1 || true
    [ -n "$CTX" ] && rm -rf "$CTX"
    if [ "$KEEP" -eq 0 ]; then rm -rf "$WORK/out" "$WORK/newroot"; fi
}
trap cleanup EXIT

# 1. base image: a minimal Debian bookworm made with debootstrap (no registry is reachable here)
if ! "${PODMAN[@]}" image exists "$BASE_IMAGE"; then
    log "creating $BASE_IMAGE with debootstrap --variant=minbase bookworm ($MIRROR)"
    rm -rf "$WORK/rootfs"
    debootstrap --variant=minbase bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || die "debootstrap failed, see $WORK/debootstrap.log"
    rm -f "$WORK"/rootfs/var/cache/apt/archives/*.deb
    tar -C "$WORK/rootfs" -c . | "${PODMAN[@]}" import - "$BASE_IMAGE" >/dev/null
    rm -rf "$WORK/rootfs"
fi

# 2. build (context: the repository's tracked and non-ignored files, plus the CPU torch wheel)
BUILD_S=0
if [ "$SKIP_BUILD" -eq 0 ]; then
    CTX="$(mktemp -d "$WORK/context.XXXX")"
    if git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
        git -C "$REPO" ls-files -co --exclude-standard -z \
            | (cd "$REPO" && tar --null --no-recursion -T - -cf -) | tar -C "$CTX" -xf -
        VCS_REF="$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)"
        SOURCE="$(git -C "$REPO" remote get-url origin 2>/dev/null || echo https://github.com/deepisles-bids/deepisles-bids)"
    else
        cp -a "$REPO"/. "$CTX"/
        VCS_REF=unknown SOURCE=https://github.com/deepisles-bids/deepisles-bids
    fi
    mkdir -p "$CTX/docker/wheels" "$CTX/docker/certs"
    # pip in the build trusts what this host trusts (a TLS-inspecting proxy's CA, say)
    CA="${EXTRA_CA:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}"
    if [ -f "$CA" ]; then cp "$CA" "$CTX/docker/certs/host-ca.crt"; fi
    WHEEL="${TORCH_WHEEL:-$(ls /opt/wheels/torch-2.13.0+cpu-cp311-*.whl 2>/dev/null | head -n1 || true)}"
    if [ "$VARIANT" = cpu ] && [ -n "$WHEEL" ]; then cp "$WHEEL" "$CTX/docker/wheels/"; fi
    WEIGHTS_ARG=()
    if [ -n "$WEIGHTS" ]; then
        cp -a "$WEIGHTS" "$CTX/docker/weights-smoke"
        WEIGHTS_ARG=(--build-arg WEIGHTS_DIR=docker/weights-smoke)
    fi
    VERSION="$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$REPO/pyproject.toml" | head -n1)"
    log "building $IMAGE (VARIANT=$VARIANT, base $BASE_IMAGE, torch wheel: ${WHEEL:-index})"
    t0=$SECONDS
    "${PODMAN[@]}" build --isolation chroot --format docker "${NO_CACHE[@]}" "${WEIGHTS_ARG[@]}" \
        --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg VARIANT="$VARIANT" \
        --build-arg VERSION="$VERSION" --build-arg VCS_REF="$VCS_REF" --build-arg SOURCE="$SOURCE" \
        -t "$IMAGE" "$CTX" >"$WORK/build.log" 2>&1 || { tail -n 40 "$WORK/build.log"; die "build failed ($WORK/build.log)"; }
    BUILD_S=$((SECONDS - t0))
    log "built in ${BUILD_S} s"
    if [ "$STAGE" -eq 1 ]; then
        # The Dockerfile's `smoke` stage, on top of the image just built (not on the build cache, which
        # may hold another lineage), in a new network namespace: chroot isolation refuses --network none.
        log "building the Dockerfile's 'smoke' stage (demo RUN step, uid 4242) with no network"
        awk -v img="$IMAGE" '/^FROM app AS smoke/ { print "FROM " img " AS smoke"; on = 1; next }
                             on && /^(FROM|# -----)/ { exit } on { print }' "$CTX/Dockerfile" \
            >"$CTX/Dockerfile.smoke"
        grep -q '^RUN' "$CTX/Dockerfile.smoke" || die "no 'FROM app AS smoke' stage in the Dockerfile"
        unshare --net "${PODMAN[@]}" build --isolation chroot --format docker --pull=never \
            -f "$CTX/Dockerfile.smoke" -t "${IMAGE}-stage" "$CTX" >"$WORK/build-stage.log" 2>&1 \
            || { tail -n 40 "$WORK/build-stage.log"; die "smoke stage failed ($WORK/build-stage.log)"; }
        log "smoke stage passed"
    fi
fi
"${PODMAN[@]}" image exists "$IMAGE" || die "no image $IMAGE"
SIZE_B="$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$IMAGE")"

# 3. what `docker run` would use: environment, entrypoint, working directory, labels
mapfile -t IMG_ENV < <("${PODMAN[@]}" image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$IMAGE" | sed '/^$/d')
mapfile -t ENTRY < <("${PODMAN[@]}" image inspect --format '{{range .Config.Entrypoint}}{{println .}}{{end}}' "$IMAGE" | sed '/^$/d')
WORKDIR="$("${PODMAN[@]}" image inspect --format '{{.Config.WorkingDir}}' "$IMAGE")"
LABEL_VERSION="$("${PODMAN[@]}" image inspect --format '{{index .Config.Labels "org.opencontainers.image.version"}}' "$IMAGE")"
LABEL_SOURCE="$("${PODMAN[@]}" image inspect --format '{{index .Config.Labels "org.opencontainers.image.source"}}' "$IMAGE")"
[ "${ENTRY[*]}" = deepisles ] || die "ENTRYPOINT is '${ENTRY[*]}', expected deepisles"
[ "$WORKDIR" = /tmp ] || die "WORKDIR is '$WORKDIR', expected /tmp"
[ -n "$LABEL_VERSION" ] && [ -n "$LABEL_SOURCE" ] || die "OCI version/source labels missing"
log "entrypoint: ${ENTRY[*]}  workdir: $WORKDIR  version label: $LABEL_VERSION  source: $LABEL_SOURCE"

# 4. the image's filesystem: everything world-readable, nothing world-writable outside /tmp
MNT="$("${PODMAN[@]}" image mount "$IMAGE")"
bad="$(find "$MNT/opt" "$MNT/data" "$MNT/out" \( ! -perm -o+r -o -perm -o+w \) ! -type l -print | head -n 5)"
[ -z "$bad" ] || die "files not world-readable or world-writable: $bad"
[ -f "$MNT/opt/deepisles/weights/SHA256SUMS" ] || die "no /opt/deepisles/weights/SHA256SUMS"
if [ -n "$WEIGHTS" ]; then
    (cd "$WEIGHTS" && sha256sum --quiet -c "$MNT/opt/deepisles/weights/SHA256SUMS") \
        || die "SHA256SUMS of the image does not match $WEIGHTS"
    n_w="$(find "$WEIGHTS" -type f | wc -l)"
    [ "$(grep -c . "$MNT/opt/deepisles/weights/SHA256SUMS")" -eq "$n_w" ] || die "SHA256SUMS misses files of $WEIGHTS"
    log "official weights: $n_w files, SHA256SUMS matches"
fi

# 5. run: new mount, network and pid namespaces; root re-bound read-only; tmpfs /tmp and /dev/shm;
#    demo data bound read-only at /data, the output folder at /out; uid:gid 4242:4242, HOME unwritable.
rm -rf "$WORK/out" && mkdir -p "$WORK/out" "$WORK/newroot" && chown "$RUN_UID:$RUN_UID" "$WORK/out"
DEMO="$REPO/bids_app/data/demo/isles22-sample"
cat >"$WORK/inside.sh" <<'EOS'
set -euo pipefail
# runs in the container's view, as uid 4242: no network, read-only root
deepisles --version
python3 - <<'PY'
import os, socket
try:
    socket.create_connection(("pypi.org", 443), timeout=3)
except OSError as exc:
    print("network: unreachable as expected:", type(exc).__name__)
else:
    raise SystemExit("network is reachable inside the smoke run")
for path in ("/", "/opt", "/usr", os.environ.get("HOME", "/")):
    try:
        open(os.path.join(path, ".smoke-write"), "w").close()
    except OSError:
        continue
    raise SystemExit(f"{path} is writable")
print("root, /opt, /usr and HOME: read-only as expected")
from models.registry import default_weights_dir
resolved = default_weights_dir().resolve()
assert str(resolved) == "/opt/deepisles/weights", f"default weights folder is {resolved}"
print("default official-weights folder:", resolved)
PY
t0=$(date +%s.%N)
deepisles /data /out participant --nprocs 2
t1=$(date +%s.%N)
deepisles /data /out group
t2=$(date +%s.%N)
python3 -c "print(f'TIMES participant {$t1-$t0:.1f} s, group {$t2-$t1:.1f} s')"
echo "written in /tmp:"; du -sh /tmp/* 2>/dev/null | sed 's/^/  /'
EOS
cat >"$WORK/ns.sh" <<EOS
set -euo pipefail
mount --make-rprivate /
R="$WORK/newroot"
mount --bind "$MNT" "\$R"
mount -o remount,bind,ro "\$R"
mount -t proc proc "\$R/proc"
mount --rbind /dev "\$R/dev"
mount -t tmpfs -o mode=1777,size=1g tmpfs "\$R/dev/shm"
mount --rbind /sys "\$R/sys" && mount -o remount,bind,ro "\$R/sys" || true
mount -t tmpfs -o mode=1777,size=8g tmpfs "\$R/tmp"
mount --bind "$DEMO" "\$R/data" && mount -o remount,bind,ro "\$R/data"
mount --bind "$WORK/out" "\$R/out"
cp "$WORK/inside.sh" "\$R/tmp/.inside.sh" && chmod 0444 "\$R/tmp/.inside.sh"
exec chroot --userspec=$RUN_UID:$RUN_UID "\$R" /usr/bin/env -i $(printf '%q ' "${IMG_ENV[@]}") \
    HOME=/nonexistent bash -c 'cd $WORKDIR && exec bash /tmp/.inside.sh'
EOS
log "running the demo: --network none, uid $RUN_UID, read-only root, tmpfs /tmp"
t0=$SECONDS
unshare --mount --net --pid --fork bash "$WORK/ns.sh" 2>&1 | tee "$WORK/run.log" | sed 's/^/    /' \
    || die "demo run failed ($WORK/run.log)"
RUN_S=$((SECONDS - t0))

# 6. outputs, owned by the run's uid
OUT="$WORK/out"
ls "$OUT"/sub-*/ses-*/dwi/*_label-lesion_mask.nii.gz >/dev/null 2>&1 || die "no lesion mask in $OUT"
[ -s "$OUT/group_lesions.tsv" ] || die "no group_lesions.tsv in $OUT"
[ -s "$OUT/dataset_description.json" ] || die "no dataset_description.json in $OUT"
foreign="$(find "$OUT" ! -uid "$RUN_UID" -print | head -n 3)"
[ -z "$foreign" ] || die "outputs not owned by uid $RUN_UID: $foreign"
log "outputs: $(find "$OUT" -type f | wc -l) files, e.g. $(cd "$OUT" && ls sub-*/ses-*/dwi/*_mask.nii.gz | head -n1)"

TIMES="$(grep '^TIMES' "$WORK/run.log" | tail -n1 | sed 's/^TIMES //')"
printf '\n== deepisles container smoke test: PASS ==\n'
printf 'image        %s (VARIANT=%s, base %s)\n' "$IMAGE" "$VARIANT" "$BASE_IMAGE"
printf 'image size   %s MB\n' "$((SIZE_B / 1000000))"
if [ "$BUILD_S" -gt 0 ]; then printf 'build time   %s s%s\n' "$BUILD_S" "${NO_CACHE:+ (--no-cache)}"; else printf 'build time   (skipped)\n'; fi
printf 'demo run     %s s wall in the namespace (%s)\n' "$RUN_S" "$TIMES"
