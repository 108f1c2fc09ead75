#!/usr/bin/env bash
# Build the project image without any container registry: a debootstrapped Debian base imported into
# the engine, Python packages from a wheelhouse prepared beforehand, then `docker build` offline.
#
#   scripts/build_image.sh [--variant cpu|cuda] [--base IMAGE] [--wheelhouse-only] [--tag-file FILE]
#
# Steps (each skipped when its result is already there):
#   1. base:       debootstrap Debian bookworm (python3.11, the version of the wheels) -> `docker import`
#                  as mammoseg-debian:bookworm. --base IMAGE uses an image already in the engine instead
#                  (e.g. a CUDA runtime base loaded with `docker load` on an air-gapped site).
#   2. wheelhouse: build/wheelhouse/<variant>/deps holds a wheel for every runtime dependency: the
#                  runtime share of requirements.lock (scripts/envlock.py image <variant>), each file
#                  checked against the lock's hashes, and torch's build of that variant
#                  (requirements-torch.txt; MAMMOSEG_TORCH_INDEX, if set, is the index it comes from);
#                  sdists are built into wheels here, so the image needs no compiler. project/ holds the
#                  mammoseg wheel.
#                  This is the only step that needs a package index (PyPI or a mirror; pip's own
#                  config, CA bundle and find-links apply).
#   3. image:      `docker build --network none`; tagged mammoseg:<variant>-<content hash> and
#                  mammoseg:<variant>. The content hash covers the Dockerfile, the base image id, the
#                  locked requirements and every file that goes into the project wheel, so an image
#                  whose inputs did not change is found by its tag and not rebuilt.
# Prints the content-hash tag on stdout (and writes it to --tag-file); progress goes to stderr.
# Needs a running engine (scripts/docker_engine.sh start) and, for the base, root and debootstrap.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

variant=cpu
base=""
wheelhouse_only=false
tag_file=""
while [ $# -gt 0 ]; do
    case "$1" in
        --variant) variant="$2"; shift 2 ;;
        --base) base="$2"; shift 2 ;;
        --wheelhouse-only) wheelhouse_only=true; shift ;;
        --tag-file) tag_file="$2"; shift 2 ;;
        *) echo "usage: $0 [--variant cpu|cuda] [--base IMAGE] [--wheelhouse-only] [--tag-file FILE]" >&2; exit 2 ;;
    esac
done
case "$variant" in cpu|cuda) ;; *) echo "build_image.sh: --variant must be cpu or cuda" >&2; exit 2 ;; esac

python="$repo_root/.venv/bin/python"
[ -x "$python" ] || { echo "build_image.sh: no .venv; run scripts/venv.sh first" >&2; exit 1; }
# The project wheel carries the Data Docs' CSS/JS (pyproject package-data); venv.sh installs them.
[ -f "$repo_root/mammoseg/data_docs_assets/node_modules/.mammoseg-installed" ] \
    || { echo "build_image.sh: the Data Docs assets are not installed; run scripts/venv.sh first" >&2; exit 1; }
suite=bookworm                       # Debian 12: python3.11, the interpreter the wheels are built for
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
base_tag="mammoseg-debian:$suite"
build_dir="$repo_root/build"
wheelhouse="$build_dir/wheelhouse/$variant"
say() { echo "build_image.sh: $*" >&2; }

# build/ is git-ignored by its own .gitignore, so no shared ignore file needs an entry for it.
mkdir -p "$build_dir"
[ -f "$build_dir/.gitignore" ] || echo '*' > "$build_dir/.gitignore"

# --- 2a. the image's share of the lock (cheap; part of the content hash) ----------------------------------
mkdir -p "$wheelhouse"
# requirements.lock: the runtime subset of the repo's requirements.lock (the dependencies and the openvino
# extra and the kubeflow SDK for cpu, the gpu extra's onnxruntime-gpu in place of onnxruntime for cuda), with its hashes.
# torch.txt: torch's build (requirements-torch.txt's version; +cpu for cpu), from MAMMOSEG_TORCH_INDEX if set.
"$python" scripts/envlock.py image "$variant" > "$wheelhouse/requirements.lock.new"
"$python" scripts/envlock.py torch "$variant" > "$wheelhouse/torch.txt.new"
for f in requirements.lock torch.txt; do
    if ! cmp -s "$wheelhouse/$f.new" "$wheelhouse/$f"; then
        mv "$wheelhouse/$f.new" "$wheelhouse/$f"
        rm -rf "$wheelhouse/deps"          # pins changed: download the wheelhouse again
    else
        rm "$wheelhouse/$f.new"
    fi
done
rm -f "$wheelhouse/constraints.txt" "$wheelhouse/requirements.in"   # the pip-freeze pins of older versions

# --- 1. the base image ------------------------------------------------------------------------------------
if [ -z "$base" ]; then
    base="$base_tag"
    if ! docker image inspect "$base" >/dev/null 2>&1 && [ "$wheelhouse_only" = false ]; then
        command -v debootstrap >/dev/null || { say "debootstrap missing (scripts/docker_engine.sh start installs it)"; exit 1; }
        rootfs="$(mktemp -d /tmp/mammoseg-rootfs.XXXXXX)"
        trap 'rm -rf "$rootfs"' EXIT
        say "debootstrap $suite from $mirror (minbase + python3.11)"
        # minbase: dpkg, apt and the essential set only; python3-venv brings ensurepip (pip, offline).
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            "$suite" "$rootfs" "$mirror" >&2
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
            "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
        tar --numeric-owner -C "$rootfs" -c . | docker import --change 'CMD ["/bin/bash"]' \
            --change 'ENV LANG=C.UTF-8' - "$base" >&2
        rm -rf "$rootfs"
        trap - EXIT
    fi
fi

# --- 3a. the content hash and the tag ---------------------------------------------------------------------
base_id="$(docker image inspect --format '{{.Id}}' "$base" 2>/dev/null || echo "no-base-yet")"
content_hash="$(
    {
        echo "variant=$variant base=$base_id"
        sha256sum Dockerfile .dockerignore "$wheelhouse/requirements.lock" "$wheelhouse/torch.txt" \
            pyproject.toml params.yaml mammoseg/data_docs_assets/package-lock.json
        find mammoseg model components pipelines -name '*.py' -o -name 'py.typed' | LC_ALL=C sort | xargs sha256sum
    } | sha256sum | cut -c1-12
)"
tag="mammoseg:$variant-$content_hash"
if [ "$wheelhouse_only" = false ] && docker image inspect "$tag" >/dev/null 2>&1; then
    say "$tag is up to date"
    docker tag "$tag" "mammoseg:$variant"
    [ -z "$tag_file" ] || echo "$tag" > "$tag_file"
    echo "$tag"
    exit 0
fi

# --- 2b. the wheelhouse ------------------------------------------------------------------------------------
if [ ! -f "$wheelhouse/deps/requirements.lock" ]; then
    say "wheelhouse: downloading the $variant runtime dependencies (requirements.lock, hash-checked)"
    rm -rf "$wheelhouse/deps.tmp"
    # Every locked package, each file checked against the lock's hashes; nothing is resolved.
    "$python" -m pip wheel --quiet --no-deps --require-hashes --wheel-dir "$wheelhouse/deps.tmp" \
        -r "$wheelhouse/requirements.lock" >&2
    index_args=()
    [ -z "${MAMMOSEG_TORCH_INDEX:-}" ] || index_args=(--index-url "$MAMMOSEG_TORCH_INDEX")
    if [ "$variant" = cuda ]; then
        # PyPI's CUDA build with its own requirements (nvidia-*-cu12, triton: not in the lock); the
        # requirements it shares with the CPU build stay at the lock's versions.
        "$python" scripts/envlock.py pins > "$wheelhouse/deps.tmp/pins.txt"
        "$python" -m pip download --quiet --only-binary=:all: --dest "$wheelhouse/deps.tmp" "${index_args[@]}" \
            -c "$wheelhouse/deps.tmp/pins.txt" -r "$wheelhouse/torch.txt" >&2
        rm "$wheelhouse/deps.tmp/pins.txt"
    else
        # The CPU build (+cpu): its requirements are all in the lock.
        "$python" -m pip download --quiet --no-deps --only-binary=:all: --dest "$wheelhouse/deps.tmp" \
            "${index_args[@]}" -r "$wheelhouse/torch.txt" >&2
    fi
    # The image installs deps/requirements.lock hash-checked. A wheel that pip built here from a
    # hash-checked sdist has a hash of its own: it is added to that package's entry (and named).
    "$python" - "$wheelhouse/requirements.lock" "$wheelhouse/deps.tmp" > "$wheelhouse/deps.tmp/requirements.lock" <<'EOF'
import hashlib, pathlib, re, sys
lock, wheels = pathlib.Path(sys.argv[1]).read_text(), pathlib.Path(sys.argv[2])
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
built = {}
for wheel in wheels.glob("*.whl"):
    digest = "sha256:" + hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest not in lock and not wheel.name.startswith("torch-"):
        built[norm(wheel.name.split("-")[0])] = digest
for line in lock.splitlines():
    print(line)
    match = re.match(r"^([A-Za-z0-9._-]+)==", line)
    if match and norm(match.group(1)) in built:
        print(f"    --hash={built.pop(norm(match.group(1)))} \\")
        print(f"build_image.sh: {match.group(1)}: the wheel built here from its sdist", file=sys.stderr)
EOF
    cp "$wheelhouse/torch.txt" "$wheelhouse/deps.tmp/"
    rm -rf "$wheelhouse/deps"
    mv "$wheelhouse/deps.tmp" "$wheelhouse/deps"
fi
say "wheelhouse: building the mammoseg wheel"
rm -rf "$wheelhouse/project"
"$python" -m pip wheel --quiet --no-deps --wheel-dir "$wheelhouse/project" "$repo_root" >&2
rm -rf "$repo_root/build/lib" "$repo_root/build/bdist."*     # setuptools' scratch, not ours to keep
[ "$wheelhouse_only" = false ] || { say "wheelhouse ready in $wheelhouse"; exit 0; }

# --- 3b. the image -----------------------------------------------------------------------------------------
say "docker build $tag (base $base)"
# --network none: the build reads only the context (wheelhouse); nothing is fetched.
docker build --network none --build-arg "BASE=$base" --build-arg "VARIANT=$variant" \
    --build-arg "WHEELHOUSE=build/wheelhouse/$variant" --label "org.opencontainers.image.revision=$content_hash" \
    --tag "$tag" --tag "mammoseg:$variant" "$repo_root" >&2
[ -z "$tag_file" ] || echo "$tag" > "$tag_file"
echo "$tag"
