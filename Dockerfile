# syntax=docker/dockerfile:1
# kproxy image: the agent (`kproxy agent`, the default command) and its CLI.
#
# The build stage runs the same Makefile targets CI runs (`make bpf wheel`: Debian build packages, BPF
# objects compiled with clang-19, the native Maglev fill (kproxy/native/libkpmaglev.so, `make native`, which
# `make wheel` pulls in) compiled with gcc, the wheel carrying them), so CI exercises this recipe even where
# no container engine exists. The runtime stage receives a ready virtualenv and holds no compiler.
#
# `make image` (mk/image.mk) builds the same image without a registry or a container engine: the same
# packages on the same Debian release, the same virtualenv, ENTRYPOINT, CMD and ENV. Change both together.
# With `--build-arg SOURCE_DATE_EPOCH=$(git log -1 --format=%ct)` both take the newest wheels uploaded to
# PyPI before the commit, as `make image` always does.

FROM debian:bookworm AS build
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends make ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# `make deps` (pulled in by both targets) installs the Debian build packages the Makefile lists.
RUN make bpf wheel
# Install the wheel and its dependencies (binary wheels only) into a self-contained virtualenv at its final
# path. pip runs from an environment of its own, so the virtualenv holds no installer; no bytecode either.
ARG SOURCE_DATE_EPOCH
RUN python3 -m venv /tmp/pip \
    && /tmp/pip/bin/pip install --no-cache-dir --upgrade pip \
    && python3 -m venv --without-pip /opt/kproxy \
    && /tmp/pip/bin/pip --python /opt/kproxy/bin/python install --no-cache-dir --no-compile --only-binary=:all: \
        ${SOURCE_DATE_EPOCH:+--uploaded-prior-to "$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)"} \
        dist/kproxy-*.whl \
    && PYTHONDONTWRITEBYTECODE=1 /opt/kproxy/bin/kproxy --help >/dev/null

FROM debian:bookworm-slim AS runtime
# python3: the agent. libbpf1: loaded through ctypes. iproute2: tc/ip for inspection and fallbacks.
# iptables, nftables: `kproxy cleanup-kube-proxy`. util-linux, mount: nsenter and mount(8) for the init
# container that mounts bpffs on the host.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 libbpf1 iproute2 iptables nftables util-linux mount ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && find / -xdev \( -name __pycache__ -o -name '*.py[co]' \) -prune -exec rm -rf {} +
# Same Python (bookworm's 3.11 at /usr/bin/python3) in both stages, so the virtualenv moves as is.
COPY --from=build /opt/kproxy /opt/kproxy
ENV PATH=/opt/kproxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
ENTRYPOINT ["kproxy"]
CMD ["agent"]
