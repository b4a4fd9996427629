# The zerofs-csi plugin image (controller and node roles; the Helm chart's nbd init
# container runs modprobe from it too).
#
# Stage 1 builds the project's wheel, with the Cython attach-path extension compiled
# against the kernel's UAPI headers by the build requirements of requirements/build.lock.
# Stage 2 installs the dependencies at the versions and hashes of requirements/image.lock
# (`make lock` writes both from pyproject.toml), then the wheel, on a slim Debian 12 base
# with only the host tools the driver executes or loads:
#   e2fsprogs    mkfs.ext4, resize2fs
#   xfsprogs     mkfs.xfs, xfs_growfs
#   btrfs-progs  mkfs.btrfs, btrfs filesystem resize
#   libblkid1    filesystem probing (fsprobe.py, through ctypes); util-linux, which
#                provides it, is Essential in Debian and so already in the base image
#   kmod         modprobe nbd (the chart's init container)
#   libnbd-bin   nbdcopy: a restore or clone's copy between two servers' exports
# Mounting, NBD attach and device locks are system calls: no mount, nbd-client or
# blkid binaries are needed. tests/chart/test_dockerfile.py keeps these lists in step
# with the code and with tools/host-packages.txt.

ARG PYTHON_IMAGE=docker.io/library/python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev linux-libc-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY requirements ./requirements
RUN python -m pip install --no-cache-dir --require-hashes --no-deps -r requirements/build.lock
COPY pyproject.toml setup.py README.md ./
COPY proto ./proto
COPY src ./src
# The project's wheel alone (the extension compiled here), built by the locked tools.
RUN python -m pip wheel --no-cache-dir --no-build-isolation --no-deps --wheel-dir /wheels . \
    && python -c "import pathlib, sys; sys.exit(not list(pathlib.Path('/wheels').glob('zerofs_csi-*-cp311-*.whl')))"

FROM ${PYTHON_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends e2fsprogs xfsprogs btrfs-progs libblkid1 kmod \
        libnbd-bin \
    && rm -rf /var/lib/apt/lists/*
COPY requirements /tmp/requirements
RUN python -m pip install --no-cache-dir --require-hashes --no-deps -r /tmp/requirements/image.lock \
    && rm -rf /tmp/requirements
COPY --from=build /wheels /wheels
# pip check: the lock holds everything the wheel requires.
RUN python -m pip install --no-cache-dir --no-index --no-deps /wheels/zerofs_csi-*.whl \
    && python -m pip check \
    && rm -rf /wheels \
    && python -c "import zerofs_csi.nbd._nbd" \
    && zerofs-csi --version
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# Root: the node role attaches NBD devices and mounts; the chart runs it privileged.
ENTRYPOINT ["zerofs-csi"]
