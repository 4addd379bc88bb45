# kproxy: build, install and test. `make test` and `make demo` do every set-up step themselves on a
# fresh Debian machine as root: Debian packages, a virtualenv, the package with its BPF objects.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CLANG ?= $(shell command -v clang-19 || command -v clang)
# -ffile-prefix-map: the checkout's path stays out of the objects' debug info (the same objects, and
# `make image`, from any directory)
BPF_CFLAGS := -O2 -g -target bpf -I/usr/include/$(shell uname -m)-linux-gnu -Wall -Werror -Wno-unused-function -I bpfsrc -I bpfsrc/include -ffile-prefix-map=$(CURDIR)=.
BPF_OBJ_DIR := kproxy/bpf/obj
BPF_SRCS := $(wildcard bpfsrc/*.bpf.c)
BPF_OBJS := $(patsubst bpfsrc/%.bpf.c,$(BPF_OBJ_DIR)/%.bpf.o,$(BPF_SRCS))
BPF_HDRS := $(shell find bpfsrc -name '*.h')
# The native Maglev table fill (kproxy/sync/maglev.py loads it through ctypes, falling back to Python).
NATIVE_LIB := kproxy/native/libkpmaglev.so
NATIVE_CFLAGS := -O2 -fPIC -shared -Wall -Wextra -Werror -ffile-prefix-map=$(CURDIR)=.
DEB_PACKAGES := clang-19 llvm-19 libbpf-dev libbpf1 bpftool iproute2 iptables nftables iperf3 \
	python3-venv python3-dev gcc make procps psmisc util-linux wrk ethtool
PYTEST_ARGS ?=

.DEFAULT_GOAL := all  # not the first target of an included file

include mk/helm.mk
include mk/bench.mk
include mk/image.mk

.PHONY: all deps bpf native venv install test test-unit demo lint clean wheel bench bench-full soak fuzz image

all: install

# $(call install_debs,PACKAGES): a recipe line installing the Debian packages that are missing, so
# repeated runs cost nothing.
define install_debs
@missing=""; for p in $(1); do \
	dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
done; \
if [ -n "$$missing" ]; then \
	echo "installing Debian packages:$$missing"; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
fi
endef

deps: .stamp-deps
.stamp-deps:
	$(call install_debs,$(DEB_PACKAGES))
	@touch $@

bpf: $(BPF_OBJS)

$(BPF_OBJ_DIR)/%.bpf.o: bpfsrc/%.bpf.c $(BPF_HDRS) | .stamp-deps
	@mkdir -p $(BPF_OBJ_DIR)
	$(CLANG) $(BPF_CFLAGS) -c $< -o $@

native: $(NATIVE_LIB)

$(NATIVE_LIB): kproxy/native/maglev.c | .stamp-deps
	$(CC) $(NATIVE_CFLAGS) -o $@ $<

venv: $(VENV)/.stamp-venv
$(VENV)/.stamp-venv: pyproject.toml | .stamp-deps
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "kproxy needs Python >= 3.11"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

install: venv bpf native

test: install helm lint
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: install
	$(PY) -m pytest tests/unit tests/abi $(PYTEST_ARGS)

demo: install
	$(PY) -m kproxy.lab.demo

lint: install
	$(VENV)/bin/ruff check kproxy tests bench
	$(VENV)/bin/ruff format --check kproxy tests bench
	$(VENV)/bin/mypy kproxy
	$(VENV)/bin/lint-imports --no-cache

wheel: install
	$(PY) -m pip wheel -q --no-deps -w dist .

bench: install loadgen
	$(PY) -m bench.run --quick

bench-full: install loadgen
	$(PY) -m bench.run --full --external

DURATION ?= 600
soak: install
	$(PY) -m bench.soak --duration $(DURATION)

# At least a million random and mutated frames through every TC program (a smaller run is in make test).
fuzz: install
	KPROXY_FUZZ_FRAMES=1000000 $(PY) -m pytest -q tests/bpf/test_fuzz.py

clean: clean-loadgen
	rm -rf $(BPF_OBJ_DIR) $(NATIVE_LIB) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
