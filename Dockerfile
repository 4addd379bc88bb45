# syntax=docker/dockerfile:1
# kproxy image: the agent (`kproxy agent`, the default command) and its CLI.
#
# The build stage runs the same Makefile targets CI runs (`make bpf wheel`: Debian build packages, BPF
# objects compiled with clang-19, the wheel carrying them), so CI exercises this recipe even where no
# container engine exists. The runtime stage receives a ready virtualenv and holds no compiler.

FROM debian:bookworm AS build
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends make ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# `make deps` (pulled in by both targets) installs the Debian build packages the Makefile lists.
RUN make bpf wheel
# Install the wheel and its dependencies into a self-contained virtualenv at its final path. Anything
# that would need compiling is built here, never in the runtime stage.
RUN python3 -m venv /opt/kproxy \
    && /opt/kproxy/bin/pip install --no-cache-dir --upgrade pip \
    && /opt/kproxy/bin/pip install --no-cache-dir dist/kproxy-*.whl \
    && /opt/kproxy/bin/kproxy --help >/dev/null

FROM debian:bookworm-slim AS runtime
# python3: the agent. libbpf1: loaded through ctypes. iproute2: tc/ip for inspection and fallbacks.
# iptables, nftables: `kproxy cleanup-kube-proxy`. util-linux, mount: nsenter and mount(8) for the init
# container that mounts bpffs on the host.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 libbpf1 iproute2 iptables nftables util-linux mount ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# Same Python (bookworm's 3.11 at /usr/bin/python3) in both stages, so the virtualenv moves as is.
COPY --from=build /opt/kproxy /opt/kproxy
ENV PATH=/opt/kproxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
ENTRYPOINT ["kproxy"]
CMD ["agent"]
