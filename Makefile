# The two commands of the README: `make demo` and `make test` (both install first when needed).
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
DEMO_DIR ?= outputs/demo

.PHONY: install deps ops ops-cpu ops-cuda-check test test-fast demo lint clean

install: deps ops

deps:
	$(PIP) install -q -r requirements.txt

# Compiled deformable attention (C++ CPU kernel always, CUDA kernel when nvcc + CUDA torch exist).
# A failed build never blocks import: the pure-PyTorch path is used instead; if only the CUDA part
# fails to compile, the CPU kernel is built alone.
ops:
	cd models/ops && ($(PYTHON) setup.py build_ext --inplace || MSDA_NO_CUDA=1 $(PYTHON) setup.py build_ext --inplace) \
		|| echo "warning: MSDeformAttn extension not built; using the pure-PyTorch path"

# CI: the CUDA sources must compile (nvcc is enough, no GPU). Reuses an up-to-date build of `make ops`
# when it has the CUDA kernel, rebuilds otherwise, and fails on a compile error.
ops-cuda-check:
	cd models/ops && FORCE_CUDA=1 $(PYTHON) setup.py build_ext --inplace && \
		($(PYTHON) -c "import sys, torch, detr_msda; sys.exit(not detr_msda.cuda_built())" || \
		FORCE_CUDA=1 $(PYTHON) setup.py build_ext --inplace --force)

test:
	$(PYTHON) -m pytest -q tests

test-fast:
	$(PYTHON) -m pytest -q -m "not slow" tests

# The CPU demo needs only the C++ kernel: skip the (slow) CUDA compile here.
ops-cpu:
	cd models/ops && MSDA_NO_CUDA=1 $(PYTHON) setup.py build_ext --inplace \
		|| echo "warning: MSDeformAttn CPU kernel not built; using the pure-PyTorch path"

demo: deps ops-cpu
	PYTHONUNBUFFERED=1 $(PYTHON) scripts/demo.py --output_dir $(DEMO_DIR)

lint:
	ruff check .

clean:
	rm -rf build models/ops/build models/ops/*.so $(DEMO_DIR)
