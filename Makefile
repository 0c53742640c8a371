# Build the BPF objects and run the project's checks. The README's two
# commands (scripts/demo and scripts/test) call these targets after they have
# installed the toolchain.

CLANG ?= clang
ARCH_INCLUDE := /usr/include/$(shell gcc -dumpmachine 2>/dev/null || echo x86_64-linux-gnu)
BPF_CFLAGS := -O2 -g -Wall -Werror -target bpf -D__TARGET_ARCH_x86 \
	-I bpf/include -I $(ARCH_INCLUDE)
BPF_SOURCES := $(wildcard bpf/*.bpf.c)
BPF_OBJECTS := $(patsubst bpf/%.bpf.c,broker/bpf/%.bpf.o,$(BPF_SOURCES))
PYTHON ?= .venv/bin/python

.PHONY: all bpf unit host vm test lint clean

all: bpf

bpf: $(BPF_OBJECTS)

broker/bpf/%.bpf.o: bpf/%.bpf.c $(wildcard bpf/include/*.h)
	@mkdir -p broker/bpf
	$(CLANG) $(BPF_CFLAGS) -c $< -o $@

unit:
	$(PYTHON) -m pytest -q tests/unit

host: bpf
	$(PYTHON) -m pytest -q tests/host

vm: bpf
	$(PYTHON) -m pytest -q tests/vm

test: bpf
	$(PYTHON) -m pytest -q tests/unit tests/host tests/vm

lint:
	$(PYTHON) -m mypy broker

clean:
	rm -f broker/bpf/*.bpf.o
