# The zerofs-csi plugin image (controller and node roles; the Helm chart's nbd init
# container runs modprobe from it too).
#
# Stage 1 builds the wheel, with the Cython attach-path extension compiled against the
# kernel's UAPI headers, and the wheels of every dependency. Stage 2 installs them on a
# slim Debian 12 base with only the host tools the driver executes or loads:
#   e2fsprogs    mkfs.ext4, resize2fs
#   xfsprogs     mkfs.xfs, xfs_growfs
#   btrfs-progs  mkfs.btrfs, btrfs filesystem resize
#   libblkid1    filesystem probing (fsprobe.py, through ctypes); util-linux, which
#                provides it, is Essential in Debian and so already in the base image
#   kmod         modprobe nbd (the chart's init container)
# Mounting, NBD attach and device locks are system calls: no mount, nbd-client or
# blkid binaries are needed. tests/chart/test_dockerfile.py keeps these lists in step
# with the code and with tools/host-packages.txt.

ARG PYTHON_IMAGE=docker.io/library/python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev linux-libc-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proto ./proto
COPY src ./src
# The project's wheel (the extension compiled here) and its dependencies' wheels.
RUN python -m pip wheel --no-cache-dir --wheel-dir /wheels . \
    && python -c "import pathlib, sys; sys.exit(not list(pathlib.Path('/wheels').glob('zerofs_csi-*-cp311-*.whl')))"

FROM ${PYTHON_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends e2fsprogs xfsprogs btrfs-progs libblkid1 kmod \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN python -m pip install --no-cache-dir --no-index --find-links /wheels zerofs-csi \
    && rm -rf /wheels \
    && python -c "import zerofs_csi.nbd._nbd" \
    && zerofs-csi --version
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# Root: the node role attaches NBD devices and mounts; the chart runs it privileged.
ENTRYPOINT ["zerofs-csi"]
