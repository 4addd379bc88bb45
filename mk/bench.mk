# Benchmark tools (stream G): the C load client and the backends' echo server.
# Included from the top-level Makefile with `include mk/bench.mk`; binaries are gitignored.
BENCH_CC ?= gcc
BENCH_CFLAGS ?= -O2 -g -Wall -Wextra -Werror -std=gnu11
LOADGEN_DIR := bench/loadgen
LOADGEN_BINS := $(LOADGEN_DIR)/kp-loadgen $(LOADGEN_DIR)/kp-echo

.PHONY: loadgen clean-loadgen

loadgen: $(LOADGEN_BINS)

$(LOADGEN_DIR)/%: $(LOADGEN_DIR)/%.c
	$(BENCH_CC) $(BENCH_CFLAGS) -o $@ $<

clean-loadgen:
	rm -f $(LOADGEN_BINS)
