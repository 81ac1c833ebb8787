# make test  : set up .venv (pinned CPU torch), build the extension, run the tests
# make demo  : generate a 60 s looped soundscape with the built-in texture model into out/
# make bench : op microbenchmarks + pipeline benchmarks, quick mode (< 15 min on 2 cores);
#              results to benchmarks/results/<machine>.json, tables in benchmarks/README.md
# make bench-full : the long versions, full-size SD 2.0 / AudioLDM included (hours);
#                   make bench-smoke : tiny sizes (CI: a broken benchmark fails)
# make cuda-check : compile every .cu file with nvcc (sm_90, compile-only)
# make serve : the web page (Gradio) on the built-in model at http://127.0.0.1:7860
#              (SERVE_ARGS="--model DIR --port 8000" for others; safa serve --help)

PYTHON ?= python3
VENV   ?= .venv
# The CPU wheel on this machine; an unpinned torch would pull a 5 GB CUDA build.
# On a GPU machine: make TORCH="torch==2.14.1" (any CUDA build) test.
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
SOURCES := setup.py pyproject.toml requirements-dev.txt $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*)

.PHONY: install test demo serve bench bench-full bench-smoke cuda-check clean

install: $(VENV)/.installed

$(VENV)/.installed: $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements-dev.txt
	# --no-build-isolation: compile against the torch installed above, not a fresh download.
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

# One worker per core, at least 3: the subprocess tests (distributed, CLI, GPU kit) wait on the
# processes they start, and a third worker keeps both cores of a small machine busy meanwhile.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -lt 3 ] && n=3; echo $$n)

test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal tests

demo: install
	$(PY) -m safa.demo --out out

# gradio comes with requirements-dev.txt (the tests drive the page), pinned there.
serve: install
	$(PY) -m safa serve $(SERVE_ARGS)

bench: install
	$(PY) benchmarks/run.py --mode quick

bench-full: install
	$(PY) benchmarks/run.py --mode full

bench-smoke: install
	$(PY) benchmarks/run.py --mode smoke
	# the GPU kit's pipeline stage, rehearsed on CPU: bench_fullsize.py runs in it unchanged
	bash benchmarks/gpu.sh --python $(PY) --rehearse --only pipeline --out out/bench-smoke/gpu-kit

cuda-check:
	bash tools/check_cuda_compile.sh

clean:
	rm -rf build *.egg-info safa_kernels/_C*.so out .pytest_cache
