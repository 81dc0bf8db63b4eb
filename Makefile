# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.featx-installed

.PHONY: venv browser demo test test-fast bench clean

venv: $(STAMP)

# The report test renders report.html in Debian's headless Chromium; it skips (with the reason) where the
# browser cannot be installed (not root, no apt).
browser:
	@command -v chromium-headless-shell >/dev/null 2>&1 || command -v chromium >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium-headless-shell) >/dev/null 2>&1; } || \
	  echo "no chromium: the browser test of report.html will skip"

# torch/torchvision pins match the wheels that lie on this machine's disk.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test,all]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

# The structure rules (package order, function/module size, signature width), ruff, then the tests.
test: $(STAMP) browser
	$(PY) scripts/check_structure.py
	$(PY) -m ruff check .
	$(PY) -m pytest -q

# The quick lane while working: the same set-up and checks, then every test not marked slow (@pytest.mark.slow:
# about a second or more each). At most 90 s of tests on 2 cores; `make test` (and CI) still run everything.
test-fast: $(STAMP) browser
	$(PY) scripts/check_structure.py
	$(PY) -m ruff check .
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/embed_bench.py --cpu-quick
	$(PY) benchmarks/heads_bench.py --cpu-quick

clean:
	rm -rf demo_data demo_out cache/*.h5 cache/*.parts
