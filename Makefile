# One-command setup: `make test` creates .venv if absent, installs the pinned stack and runs the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements.stamp

.PHONY: test demo install clean

install: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# Re-install only when requirements.txt changed since the last successful install.
$(STAMP): requirements.txt | $(VENV)/bin/python
	$(PY) -m pip install --disable-pip-version-check --progress-bar on -r requirements.txt
	@# The first import of mmengine makes yapf write its grammar cache; parallel first imports (two
	@# segmentation runs, dist_train.sh with several processes) could read it half-written.
	$(PY) -c "import mmengine.config"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q tests

demo: install
	$(PY) tools/demo.py

clean:
	rm -rf $(VENV) .pytest_cache
