# The two commands of the README: `make demo` and `make test`. Each installs what is missing first
# (requirements, the compiled deformable-attention op) and then runs; run again, they reinstall and
# recompile nothing that is up to date (a few seconds of checks).
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
DEMO_DIR ?= outputs/demo
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: install deps ops ops-cpu ops-auto ops-cuda-check test test-fast demo lint clean

install: deps ops

# Every line of requirements.txt already satisfied? (importlib.metadata, ~0.1 s; any doubt: pip decides)
DEPS_OK = $(PYTHON) -c "import importlib.metadata as m, sys; from pip._vendor.packaging.requirements import Requirement; \
	reqs = [Requirement(line.split('\#')[0]) for line in open('requirements.txt') if line.split('\#')[0].strip()]; \
	sys.exit(not all(r.specifier.contains(m.version(r.name), prereleases=True) \
	                 for r in reqs if not r.marker or r.marker.evaluate()))"

deps:
	@$(DEPS_OK) 2>/dev/null || PIP_DISABLE_PIP_VERSION_CHECK=1 $(PIP) install -q -r requirements.txt

# The in-tree op (models/ops/detr_msda*.so) is up to date when it is newer than its sources and than the
# installed torch (a torch upgrade needs a rebuild). Checked from file times, without importing torch.
MSDA_FRESH = $(PYTHON) -c "import importlib.util as u, pathlib as p, sysconfig as s, sys; \
	o = p.Path('models/ops'); so = o / ('detr_msda' + s.get_config_var('EXT_SUFFIX')); t = u.find_spec('torch'); \
	deps = [o / 'setup.py', *o.glob('src/**/*.*')] + ([p.Path(t.origin).with_name('version.py')] if t else []); \
	sys.exit(not (t and so.is_file() and all(d.stat().st_mtime <= so.stat().st_mtime for d in deps)))"
# Whether that build has the CUDA kernel (imports torch, ~2 s).
MSDA_HAS_CUDA = (cd models/ops && $(PYTHON) -c "import sys, torch, detr_msda; sys.exit(not detr_msda.cuda_built())" \
	2>/dev/null)
BUILD_ALL = (cd models/ops && ($(PYTHON) setup.py build_ext --inplace || MSDA_NO_CUDA=1 $(PYTHON) setup.py build_ext \
	--inplace)) || echo "warning: MSDeformAttn extension not built; using the pure-PyTorch path"
BUILD_CPU = (cd models/ops && MSDA_NO_CUDA=1 $(PYTHON) setup.py build_ext --inplace) \
	|| echo "warning: MSDeformAttn CPU kernel not built; using the pure-PyTorch path"

# Compiled deformable attention (C++ CPU kernel always, CUDA kernel when nvcc + CUDA torch exist).
# A failed build never blocks import: the pure-PyTorch path is used instead; if only the CUDA part
# fails to compile, the CPU kernel is built alone. Always runs setup.py: ninja recompiles only what
# changed (nothing: a few seconds), but switching between a CPU-only and a CUDA build recompiles.
ops: deps
	@$(BUILD_ALL)

# The CPU demo needs only the C++ kernel: any up-to-date build is kept (one with CUDA too), else the
# CPU kernel is built alone (about a minute; the CUDA kernel takes several).
ops-cpu: deps
	@if $(MSDA_FRESH); then echo "detr_msda: the compiled op is up to date"; else $(BUILD_CPU); fi

# What the tests need: the C++ kernel, plus the CUDA kernel where a GPU can run it.
ops-auto: deps
	@if ! nvidia-smi -L >/dev/null 2>&1; then \
		if $(MSDA_FRESH); then echo "detr_msda: the compiled op is up to date"; else $(BUILD_CPU); fi; \
	elif $(MSDA_FRESH) && $(MSDA_HAS_CUDA); then echo "detr_msda: the compiled op (with CUDA) is up to date"; \
	else $(BUILD_ALL); fi

# CI: the CUDA sources must compile (nvcc is enough, no GPU). Keeps an up-to-date build that has the
# CUDA kernel, rebuilds otherwise, and fails on a compile error.
ops-cuda-check: deps
	@if $(MSDA_FRESH) && $(MSDA_HAS_CUDA); then echo "detr_msda: the compiled op (with CUDA) is up to date"; \
	else cd models/ops && FORCE_CUDA=1 $(PYTHON) setup.py build_ext --inplace && \
		($(PYTHON) -c "import sys, torch, detr_msda; sys.exit(not detr_msda.cuda_built())" || \
		FORCE_CUDA=1 $(PYTHON) setup.py build_ext --inplace --force); fi

test: ops-auto
	$(PYTHON) -m pytest -q tests $(PYTEST_ARGS)

test-fast: ops-auto
	$(PYTHON) -m pytest -q -m "not slow" tests $(PYTEST_ARGS)

demo: ops-cpu
	PYTHONUNBUFFERED=1 $(PYTHON) scripts/demo.py --output_dir $(DEMO_DIR) $(DEMO_ARGS)

lint:
	ruff check .

clean:
	rm -rf build models/ops/build models/ops/*.so $(DEMO_DIR)
