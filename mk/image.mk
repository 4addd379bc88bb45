# `make image`: the kproxy OCI image as an archive, built without a registry or a container engine.
#
# mmdebstrap makes a Debian bookworm root filesystem from Debian's archive (the runtime packages of the
# Dockerfile's runtime stage, no compiler, no docs, man pages, locales or apt lists), a customize hook
# installs the wheel of `make wheel` and its PyPI dependencies into a virtualenv at /opt/kproxy inside
# it, and umoci turns the tarball into a one-layer OCI image with the Dockerfile's ENTRYPOINT, CMD and
# ENV. The result, dist/kproxy-image.tar, is an OCI image layout in a tar (an `oci-archive`), tagged
# $(IMAGE_TAG) and named $(IMAGE_NAME):$(IMAGE_TAG) for containerd. docs/install.md tells how to load it.
#
# Reproducible: SOURCE_DATE_EPOCH is the commit's time. mmdebstrap sorts the tarball, clamps mtimes to
# it and drops its logs and caches; Python wheels are the newest uploaded to PyPI before it; no .pyc
# files; the OCI config and history carry it as their date. Two builds of one commit in one directory
# give the same archive, bit for bit, as long as Debian's archive (bookworm, -updates, -security) has not
# changed in between: no snapshot mirror is reachable to pin it. From another directory too: the BPF
# objects are compiled with -ffile-prefix-map, so their debug information names no checkout path.
#
# Included by the top-level Makefile, which defines PY, the `wheel` target and the `deps` mechanism.

IMAGE_TAR := dist/kproxy-image.tar
KPROXY_VERSION = $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE_TAG ?= $(KPROXY_VERSION)
# The name the chart pulls by default (image.repository=kproxy, tag=appVersion), as containerd spells it.
IMAGE_NAME ?= docker.io/library/kproxy
IMAGE_SUITE := bookworm
# The Dockerfile's runtime stage, on the same package set as debian:bookworm-slim (variant minbase:
# Essential and Priority required packages).
IMAGE_VARIANT := minbase
IMAGE_DEB_PACKAGES := python3 libbpf1 iproute2 iptables nftables util-linux mount ca-certificates
# The image's Python: bookworm's 3.11, glibc 2.36.
IMAGE_PYTHON := 3.11
IMAGE_GLIBC_MINOR := 36
# Wheels come from PyPI, or from this index if set: the build ignores pip's configuration files and PIP_*
# variables, which may point elsewhere.
IMAGE_PIP_INDEX ?=
# Tools that build the image, from Debian.
IMAGE_TOOL_PACKAGES := mmdebstrap umoci
# The commit's time; outside git, the newest mtime among the build inputs.
SOURCE_DATE_EPOCH ?= $(shell git log -1 --format=%ct 2>/dev/null || \
	find pyproject.toml Makefile mk kproxy bpfsrc -type f -printf '%T@\n' | sort -n | tail -1 | cut -d. -f1)
IMAGE_REVISION = $(shell git rev-parse HEAD 2>/dev/null || echo unknown)

.PHONY: image test-image

# Debian packages, installed only when missing (install_debs, in the Makefile).
.stamp-image-deps:
	$(call install_debs,$(IMAGE_TOOL_PACKAGES))
	@touch $@

# Rebuilt at every call (the wheel is too); a failed build leaves the previous archive in place. The
# script below reaches the recipe through its environment, so it reads as a script.
image: export KPROXY_IMAGE_SH = $(image_sh)
image: wheel .stamp-image-deps
	@SOURCE_DATE_EPOCH='$(SOURCE_DATE_EPOCH)' bash -c "$$KPROXY_IMAGE_SH"

test-image: image
	$(PY) -m pytest -v tests/chart/test_image.py $(PYTEST_ARGS)

# The build, as one bash script.
define image_sh
set -euo pipefail
start=$$(date +%s)
[[ "$$SOURCE_DATE_EPOCH" =~ ^[0-9]+$$ ]] || { echo "SOURCE_DATE_EPOCH is not a number: '$$SOURCE_DATE_EPOCH'" >&2; exit 1; }
export SOURCE_DATE_EPOCH
created=$$(date -u -d "@$$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)
wheel=dist/kproxy-$(KPROXY_VERSION)-py3-none-any.whl
[ -f "$$wheel" ] || { echo "$$wheel is missing (make wheel)" >&2; exit 1; }
work=$$(mktemp -d "$${TMPDIR:-/tmp}/kproxy-image.XXXXXX")
# mmdebstrap runs in its own mount namespace (--mode=unshare), so nothing stays mounted here; never
# follow a mount point out of the work directory all the same.
trap 'rm -rf --one-file-system "$$work"' EXIT

echo "== wheels for CPython $(IMAGE_PYTHON), glibc 2.$(IMAGE_GLIBC_MINOR), uploaded before $$created"
arch=$$(uname -m)
platforms=(--platform "manylinux2014_$$arch")
for minor in $$(seq $(IMAGE_GLIBC_MINOR) -1 17); do platforms+=(--platform "manylinux_2_$${minor}_$$arch"); done
PIP_CONFIG_FILE=/dev/null $(PY) -m pip --isolated download -q --disable-pip-version-check --no-cache-dir \
	$(if $(IMAGE_PIP_INDEX),--index-url $(IMAGE_PIP_INDEX)) --only-binary=:all: \
	--python-version $(IMAGE_PYTHON) --implementation cp --abi cp$(subst .,,$(IMAGE_PYTHON)) "$${platforms[@]}" \
	--uploaded-prior-to "$$created" -d "$$work/wheelhouse" "$$wheel" pip
pipwhl=$$(cd "$$work/wheelhouse" && ls pip-*.whl)
# Commands in the new root see nothing of this machine's environment (PIP_*, PYTHON*, locale).
chroot_env="env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root PYTHONDONTWRITEBYTECODE=1"

# Debian's archive from the mirrors this machine's apt uses for $(IMAGE_SUITE) (main, -updates, -security);
# on a machine without them, mmdebstrap's default mirrors for the release.
mapfile -t sources < <(apt-get indextargets --no-release-info --format '$$(REPO_URI) $$(RELEASE)' 'Identifier: Packages' \
	2>/dev/null | awk '$$2 ~ /^$(IMAGE_SUITE)(-updates|-security)?$$/ {print "deb " $$1 " " $$2 " main"}' | sort -u)
echo "== root filesystem: Debian $(IMAGE_SUITE) ($(IMAGE_VARIANT)) + $(IMAGE_DEB_PACKAGES) + /opt/kproxy"
printf '   %s\n' "$${sources[@]:-none found: the default mirrors of mmdebstrap}"
TMPDIR="$$work" mmdebstrap --mode=unshare --variant=$(IMAGE_VARIANT) --format=tar \
	--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
	--include="$$(echo $(IMAGE_DEB_PACKAGES) | tr ' ' ,)" \
	--aptopt='APT::Install-Recommends "false"' \
	--dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
	--dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
	--dpkgopt='path-exclude=/usr/share/groff/*' --dpkgopt='path-exclude=/usr/share/lintian/*' \
	--dpkgopt='path-exclude=/usr/share/linda/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
	--customize-hook="copy-in $$work/wheelhouse /tmp" \
	--customize-hook="chroot \"\$$1\" $$chroot_env python3 -m venv --without-pip /opt/kproxy" \
	--customize-hook="chroot \"\$$1\" $$chroot_env /opt/kproxy/bin/python /tmp/wheelhouse/$$pipwhl/pip --isolated \
		install -q --no-index --find-links /tmp/wheelhouse --no-compile --no-cache-dir --disable-pip-version-check \
		--root-user-action=ignore kproxy==$(KPROXY_VERSION)" \
	--customize-hook="chroot \"\$$1\" $$chroot_env /opt/kproxy/bin/kproxy version" \
	--customize-hook='rm -rf "$$1"/tmp/wheelhouse "$$1"/etc/resolv.conf "$$1"/etc/hostname' \
	--customize-hook='find "$$1" -xdev \( -name __pycache__ -o -name "*.py[co]" \) -prune -exec rm -rf {} +' \
	$(IMAGE_SUITE) "$$work/rootfs.tar" "$${sources[@]}"
# Device nodes are the runtime's business (it mounts /dev); keep the empty directory only.
tar --delete --wildcards -f "$$work/rootfs.tar" './dev/?*'

echo "== OCI image $(IMAGE_NAME):$(IMAGE_TAG)"
oci="$$work/oci"
umoci init --layout "$$oci"
umoci new --image "$$oci:$(IMAGE_TAG)"
umoci raw add-layer --image "$$oci:$(IMAGE_TAG)" --history.created "$$created" \
	--history.created_by "make image: mmdebstrap $(IMAGE_SUITE) $(IMAGE_VARIANT) + $(IMAGE_DEB_PACKAGES) + /opt/kproxy" \
	"$$work/rootfs.tar"
umoci config --image "$$oci:$(IMAGE_TAG)" --no-history --created "$$created" \
	--config.entrypoint kproxy --config.cmd agent --config.workingdir / \
	--config.env PATH=/opt/kproxy/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
	--config.env PYTHONDONTWRITEBYTECODE=1 --config.env PYTHONUNBUFFERED=1 \
	--config.label org.opencontainers.image.title=kproxy \
	--config.label org.opencontainers.image.version=$(KPROXY_VERSION) \
	--config.label org.opencontainers.image.revision=$(IMAGE_REVISION) \
	--config.label org.opencontainers.image.created="$$created"
umoci gc --layout "$$oci"
# containerd (ctr images import) names the image from this annotation (OCI's ref.name is only the tag);
# the platform lets importers pick the manifest without reading its config.
$(PY) - "$$oci/index.json" '$(IMAGE_NAME):$(IMAGE_TAG)' "$$(dpkg --print-architecture)" <<'EOF'
import json, sys
path, name, arch = sys.argv[1:]
index = json.load(open(path))
for m in index["manifests"]:
    m.setdefault("annotations", {})["io.containerd.image.name"] = name
    m["platform"] = {"architecture": arch, "os": "linux"}
with open(path, "w") as f:
    json.dump(index, f, sort_keys=True, separators=(",", ":"))
EOF
find "$$oci" -exec touch -h -d "@$$SOURCE_DATE_EPOCH" {} +
tar -C "$$oci" --sort=name --mtime="@$$SOURCE_DATE_EPOCH" --owner=0 --group=0 --numeric-owner --mode=u=rwX,go=rX \
	--format=posix \
	--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime -cf "$$work/image.tar" blobs index.json oci-layout
mkdir -p dist
mv "$$work/image.tar" $(IMAGE_TAR)

layer=$$(tar -tvf "$$work/rootfs.tar" | awk '{s += $$3} END {printf "%.0f", s / 1048576}')
echo "== $(IMAGE_TAR): $$(du -m $(IMAGE_TAR) | cut -f1) MiB ($$layer MiB unpacked), built in $$(( $$(date +%s) - start )) s"
echo "   layer diff_id $$(sha256sum < "$$work/rootfs.tar" | cut -d' ' -f1) (rootfs tree), SOURCE_DATE_EPOCH $$SOURCE_DATE_EPOCH"
echo "   manifest $$($(PY) -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifests"][0]["digest"])' "$$oci/index.json")"
echo "   Debian $(IMAGE_SUITE) $(IMAGE_VARIANT): $$(tar -xOf "$$work/rootfs.tar" ./var/lib/dpkg/status | grep -c '^Package:') packages, among them $(IMAGE_DEB_PACKAGES)"
echo "   /opt/kproxy: $$(cd "$$work/wheelhouse" && ls *.whl | grep -v '^pip-' | sed 's/-py[0-9].*//; s/-cp[0-9].*//' | sort -f | tr '\n' ' ')"
echo "   largest: $$(tar -tvf "$$work/rootfs.tar" | awk '{split($$6, p, "/"); d = p[2] "/" p[3] "/" p[4]; s[d] += $$3} END {for (d in s) printf "%d %s\n", s[d] / 1048576, d}' | sort -rn | head -6 | awk '{printf "%s%s %s MiB", sep, $$2, $$1; sep = ", "}')"
endef
