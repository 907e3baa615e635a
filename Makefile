# nitro's build, test, lint, benchmark and fuzz targets (README.md, "Quick start").
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.nitro-installed
# Pinned: a new release of either may report new things on an unchanged tree.
RUFF   := ruff==0.17.6
MYPY   := mypy==2.4.1

.PHONY: all deps venv build test unit system demo demo-fleet bench lint typecheck clean fuzz fuzz-short soak

all: build

deps:
	./tools/install-deps.sh

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

# Rebuild the extension whenever the C sources or the package metadata change.
$(STAMP): $(PY) pyproject.toml setup.py $(wildcard cffi_build/*.c cffi_build/*.cpp cffi_build/*.h cffi_build/*.py)
	$(PIP) install -q cffi 'setuptools>=77' wheel
	$(PIP) install -q --no-build-isolation -e '.[test]'
	touch $@

venv: $(STAMP)

build: deps venv
	$(MAKE) -C tools

test: build
	$(PY) -m pytest -q

unit: venv
	$(PY) -m pytest -q tests/unit

system: build
	$(PY) -m pytest -q -m system

demo: build
	$(PY) tools/demo.py

# docs/fleet.md "Running a fleet by hand" with two TCG guests on two hosts (needs root).
demo-fleet: build
	$(PY) tools/demo_fleet.py

# Each bench module runs nitro and its reference in one run and prints ratios.
bench: build
	$(PY) -m bench.blk --backend both
	@for m in crypto gcm net fleet density tenant qos nbd rbd; do \
	    $(PY) -m bench.$$m || exit 1; \
	done

# docs/reliability.md "Fuzzing": 10^6 cases per target (vring, blk, vhost, net),
# then the ASan+UBSan build of the extension replays corpus and regressions.
fuzz: deps venv
	$(PY) tests/fuzz/run.py --runs 1000000
	./tools/build-sanitized.sh

# docs/reliability.md "Soak": the SIGKILL cycle test of `make test`, 200 cycles.
soak: build
	NITRO_SOAK_CYCLES=$${NITRO_SOAK_CYCLES:-200} $(PY) -m pytest -q -s tests/system/test_blk_restart.py

fuzz-short: deps venv
	$(PY) -m pytest -q tests/fuzz

# ruff needs nothing built: it runs first in CI and fails fast.
lint: $(PY)
	$(PIP) install -q '$(RUFF)'
	$(VENV)/bin/ruff check nitro tests bench tools

# mypy on nitro/ (pyproject.toml [tool.mypy]); it reads nitro's dependencies
# from the venv.
typecheck: venv
	$(PIP) install -q '$(MYPY)'
	$(VENV)/bin/mypy

clean:
	rm -rf build nitro/_nitro_c*.so nitro/_nitro_c.c tools/bin *.egg-info
