# zerofs-csi: every target sets up what it needs (tools/bootstrap.sh is idempotent).
PY        := .venv/bin/python
PYTEST    := .venv/bin/pytest
# ZEROFS_BIN (a ZeroFS binary; see src/zerofs_csi/bench/zerofs_server.py) reaches the
# microVM's commands, which run it instead of the stand-in, with their volumes on a MinIO
# server of MINIO_BIN (ZeroFS 2.3 refuses file:// storage; make minio builds it).
VM        = python3 tests/vm/runner.py --env ZEROFS_BIN --env MINIO_BIN=$(MINIO)
# make test's microVM (the privileged suite, then csi-sanity) took 2213 s of its 2400 on a
# fresh machine on 2026-12-07 (21 minutes before): the limit leaves room for such a host.
VM_TIMEOUT ?= 3600
ITERATIONS ?= 20
DURATION  ?= 600
CHAOS     ?= 0
SEED      ?=
# The volumes make e2e writes, expands and faults (tools/cluster/e2e.py --volumes).
E2E_VOLUMES ?= ext4,xfs,raw
# Builds shared by every clone on this machine (tools/cache-dir says where and why).
CACHE     := $(shell tools/cache-dir)
# csi-sanity, the CSI conformance suite: the kubernetes-csi/csi-test release it is built from.
CSI_TEST_VERSION := v5.6.0
CSI_SANITY := $(CACHE)/csi-sanity/$(CSI_TEST_VERSION)/csi-sanity
# MinIO, the distributed S3 set the S3 tests also run against (tests/s3/minio.py): the
# newest version of its module the proxy serves, RELEASE.2025-10-15T17-29-55Z and the
# fixes after it up to the project's move to maintenance (its release tags are not served).
MINIO_VERSION := v0.0.0-20260212201848-7aac2a2c5b7c
MINIO := $(CACHE)/minio/$(MINIO_VERSION)/minio

.PHONY: all bootstrap build proto lint kube-assets cluster-build cluster-images cluster-runtime-check test test-unit test-vm-after-host test-e2e test-s3 test-vm test-vm-sanity test-long privileged-suite vm-prepare demo bench \
	nbd-regression chaos soak soak-minio logs wheel lock clean

all: build

bootstrap:
	@tools/bootstrap.sh

# Rebuilds the Cython extension in place after src/zerofs_csi/nbd/_nbd.pyx, its .pxi parts or its
# .pxd changed.
build: bootstrap
	@$(PY) setup.py -q build_ext --inplace

proto: bootstrap
	$(PY) tools/gen_proto.py

# stubtest needs the built extension: it holds _nbd.pyi against what the module exports.
lint: build
	.venv/bin/ruff check src tests tools
	.venv/bin/ruff format --check src tests tools
	.venv/bin/mypy
	$(PY) -m mypy.stubtest --concise --allowlist src/zerofs_csi/nbd/stubtest-allowlist.txt \
		zerofs_csi.nbd._nbd
	$(PY) tools/gen_proto.py --check

# kube-apiserver, etcd and kubectl built from their Go modules into $(CACHE)/kube/ (envtest
# layout): the API server the Kubernetes-backend tests run against besides the fake.
# Nothing to do when they are built at the versions in tools/cluster/versions.env.
KUBE_ASSETS = $(shell tools/cluster/build.sh --print-dir)

kube-assets:
	@tools/cluster/build.sh kube-apiserver etcd kubectl

# Everything the single-node test cluster runs, built from source into the same folder
# (README: "Test cluster"); make test runs it through test-e2e.
CLUSTER_COMPONENTS := kube-apiserver etcd kubectl kube-controller-manager kube-scheduler \
	kubelet kube-proxy csi-provisioner csi-attacher csi-resizer csi-snapshotter \
	snapshot-controller snapshot-crds containerd containerd-shim-runc-v2 ctr runc cni pause

# At the lowest priority, as the images below: make test builds them beside its host
# tests. After kube-assets, which the host tests wait for (one build at a time).
cluster-build: kube-assets
	@nice -n 19 tools/cluster/build.sh $(CLUSTER_COMPONENTS)

# Every image the test cluster runs, as OCI archives for the node's containerd (no registry
# here; tools/cluster/images.sh says which and how).
cluster-images: cluster-build
	@nice -n 19 tools/cluster/images.sh

# containerd and runc from cluster-build import every image of cluster-images in the
# microVM and run each (the images are built here: the microVM has no network). The
# builds' lock, held shared, keeps the archives listed until the check is done.
cluster-runtime-check: bootstrap cluster-images
	flock --shared $(KUBE_ASSETS)/images/.lock sh -ec '\
		tools/cluster/images.sh --built >$(KUBE_ASSETS)/images/runtime-check.txt; \
		$(VM) --timeout 3600 --mem 4096 --env ZEROFS_CSI_CACHE=$(CACHE) -- \
			tools/cluster/runtime_check.sh \
			$(KUBE_ASSETS)/images/runtime-check.txt'

# Host tests: everything not needing the kernel's NBD driver or an S3 server; the
# Kubernetes-backend tests against the real kube-apiserver too (KUBEBUILDER_ASSETS).
test-unit: build kube-assets
	KUBEBUILDER_ASSETS=$(KUBE_ASSETS) $(PYTEST) -m "not privileged and not s3" -q --durations=10

# Against real S3 servers, started by the fixtures: a single-node Ceph radosgw on loopback,
# and for the S3 clean-up tests also a distributed MinIO set (tests/s3/minio.py).
test-s3: build minio
	MINIO_BIN=$(MINIO) $(PYTEST) -m s3 -q tests

# Installs QEMU and the guest tools, downloads the Debian kernel, builds the initramfs.
vm-prepare:
	$(VM) --prepare-only

# Privileged tests: directly where this host has NBD and root, otherwise in the microVM.
test-vm: build
	@$(MAKE) --no-print-directory privileged-suite MARKS="privileged and not long"

PRIVILEGED_PYTEST = $(PYTEST) -m "$(MARKS)" -q -p no:cacheprovider --durations=15 tests/privileged
SANITY_ALL = $(PY) tools/harness/sanity.py --run all --csi-sanity $(CSI_SANITY)

# make test's microVM: the privileged suite (but "long"), then csi-sanity against every
# service, in one boot; either one failing fails it.
test-vm-sanity: MARKS = privileged and not long
test-vm-sanity: build $(CSI_SANITY)
	$(VM) --timeout $(VM_TIMEOUT) --mem 4096 -- \
		sh -c '$(PRIVILEGED_PYTEST); suite=$$?; $(SANITY_ALL) && exit $$suite'

# The privileged tests make test leaves to its cluster e2e (marker "long").
test-long: build
	@$(MAKE) --no-print-directory privileged-suite MARKS="privileged and long"

# In the microVM the stand-in's file:// exports live in the guest's tmpfs: 4 GiB of memory
# holds the suite's volumes (2 GiB ran out of space).
privileged-suite:
	@if [ "$$(id -u)" = 0 ] && [ -e /dev/nbd0 ] && [ -r /sys/module/nbd ]; then \
		$(PYTEST) -m "$(MARKS)" -q --durations=15 tests/privileged; \
	else \
		$(VM) --timeout $(VM_TIMEOUT) --mem 4096 -- $(PRIVILEGED_PYTEST); \
	fi

.PHONY: cluster e2e

# With ZEROFS_BIN the cluster's volume servers run it (images.sh's zerofs image) and its
# S3 store is a MinIO server instead of a radosgw (tools/cluster/cluster.py says why).
CLUSTER_S3 := $(if $(ZEROFS_BIN),$(MINIO))
CLUSTER   := MINIO_BIN=$(MINIO) $(PY) tools/cluster/cluster.py

# The single-node test cluster (README: "Test cluster"): control plane here, node in the
# microVM, until ^C; prints the admin KUBECONFIG.
cluster: build cluster-images $(CLUSTER_S3)
	$(CLUSTER) up --s3 --snapshot-api

# The chart installed as the README says and the user's path through it (build/e2e.md).
e2e: build cluster-images $(CLUSTER_S3)
	$(CLUSTER) run --s3 --snapshot-api --timeout 7200 -- $(PY) tools/cluster/e2e.py \
		--volumes $(E2E_VOLUMES)

# make test's part of it (README: "Test cluster"), its table in build/e2e-short.md.
test-e2e: build cluster-images $(CLUSTER_S3)
	$(CLUSTER) run --s3 --timeout 2400 -- \
		$(PY) tools/cluster/e2e.py --short --output build/e2e-short.md

.PHONY: csi-sanity minio sanity-controller sanity-vm

# Go tools are built once from their modules into the target's folder; Go's module and
# build caches stay in their default places. GOTOOLCHAIN=auto: a Go older than the module
# asks for fetches the one it needs. At the lowest priority: a build takes the cores for
# minutes.
GO_INSTALL = command -v go >/dev/null || { echo "building $(@F) needs Go: https://go.dev/dl/" >&2; exit 1; }; \
	GOBIN=$(@D) GOFLAGS=-modcacherw GOTOOLCHAIN=auto nice -n 19 go install

$(CSI_SANITY):
	$(GO_INSTALL) github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@$(CSI_TEST_VERSION)

csi-sanity: $(CSI_SANITY)

# Static, as MinIO's own release builds are.
$(MINIO): export CGO_ENABLED = 0
$(MINIO):
	$(GO_INSTALL) -trimpath -ldflags "-s -w" github.com/minio/minio@$(MINIO_VERSION)

minio: $(MINIO)

# csi-sanity against the controller role on this host (tools/harness/sanity.py).
sanity-controller: build $(CSI_SANITY)
	$(PY) tools/harness/sanity.py --run controller --csi-sanity $(CSI_SANITY)

# csi-sanity against every service (--role all) in the microVM.
sanity-vm: build $(CSI_SANITY)
	$(VM) --timeout $(VM_TIMEOUT) -- $(SANITY_ALL)

# The microVM's set-up first (its packages and kernel). Then the lint, the host tests,
# the S3 tests and csi-sanity's controller run side by side (none needs another's
# servers, and each leaves a core idle much of the time), then the privileged suite's
# microVM; the cluster's builds and images run beside all of them at the lowest priority,
# taking the cycles they leave, and the e2e's microVM runs alone once they are done (the
# two microVMs side by side, each emulating two CPUs on the two cores, had neither
# finished after 23 min, where in turn they take 12.5 and 8.5). Each one's
# output is printed whole when it ends; tools/apt-install keeps their package installs
# one at a time. With the builds cached this is the same as running everything in turn;
# on a fresh machine the builds are most of the time (measured: 52.5 min with them
# after the host tests and before the microVMs, 52.5 with them beside the privileged
# suite only, 57 with them beside the host tests only: alone, images.sh kept the cores
# half busy for 10 min).
test: build
	@$(MAKE) --no-print-directory vm-prepare
	@$(MAKE) --no-print-directory -j4 --output-sync=target cluster-images test-vm-after-host
	@$(MAKE) --no-print-directory test-e2e

# make test's tests before its e2e: the host ones and the lint side by side, then the
# microVM's.
test-vm-after-host: test-unit test-s3 sanity-controller lint
	@$(MAKE) --no-print-directory test-vm-sanity

demo: build
	$(VM) --timeout $(VM_TIMEOUT) -- $(PY) tools/demo.py

bench: build
	@mkdir -p build
	$(VM) --timeout 3600 -- $(PY) -m zerofs_csi.bench --output build/bench.json --chart build/bench.png

# Stage/publish/write/verify/unpublish/unstage cycles; CHAOS=1 adds seeded faults (SEED= replays).
nbd-regression: build
	$(VM) --timeout $(VM_TIMEOUT) -- $(PY) tools/harness/regression.py --iterations $(ITERATIONS) \
		$(if $(filter-out 0,$(CHAOS)),--chaos) $(if $(SEED),--seed $(SEED))

# ITERATIONS rounds of server stalls (5 s to 2 min) and kills, plugin kills and both, under a
# writer; data and the kernel log checked after each (SEED= replays).
chaos: build
	$(VM) --timeout $$(( $(ITERATIONS) * 300 + 900 )) -- $(PY) tools/harness/chaos.py \
		--rounds $(ITERATIONS) $(if $(SEED),--seed $(SEED))

# fio with crc32c verification on a staged volume while its server is killed; DURATION seconds.
soak: build
	$(VM) --timeout $$(( $(DURATION) * 2 + 900 )) -- $(PY) tools/harness/soak.py --duration $(DURATION)

# The same with the volume on a MinIO set of four servers, killed and cut off under the
# writer one at a time and a write quorum at a time (docs/ha-minio.md). Four MinIO
# servers and ZeroFS beside the plugin need more than the microVM's default memory; their
# drives go on a disk of their own (sparse, made anew each run), which takes O_DIRECT.
SOAK_DRIVES_DISK = $(CACHE)/soak-minio/drives.img
soak-minio: build $(MINIO)
	mkdir -p $(dir $(SOAK_DRIVES_DISK)) && rm -f $(SOAK_DRIVES_DISK) && truncate -s 16G $(SOAK_DRIVES_DISK)
	$(VM) --timeout $$(( $(DURATION) * 2 + 1800 )) --mem 4096 --disk $(SOAK_DRIVES_DISK) -- \
		$(PY) tools/harness/soak.py --minio-set --drives-disk /dev/vda --duration $(DURATION)

logs:
	$(PY) tools/harness/logs.py --output validation-logs.txt

wheel: bootstrap
	$(PY) -m build --wheel --outdir dist .

# The exact versions, with their hashes, that the image installs: pyproject.toml's runtime
# dependencies (requirements/image.lock) and build requirements (requirements/build.lock),
# resolved for the image's Python 3.11 on Debian 12 (glibc 2.36) at today's newest.
LOCK := .venv/bin/uv pip compile --quiet --generate-hashes --python-version 3.11 \
	--python-platform x86_64-manylinux_2_36 --custom-compile-command "make lock"

lock: bootstrap
	$(LOCK) --output-file requirements/image.lock pyproject.toml
	$(PY) -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")' \
		| $(LOCK) --output-file requirements/build.lock -

clean:
	rm -rf build dist .pytest_cache .mypy_cache .ruff_cache src/*.egg-info
	rm -f src/zerofs_csi/nbd/_nbd.c src/zerofs_csi/nbd/_nbd.html src/zerofs_csi/nbd/_nbd*.so
