PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test lint format demo clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

DEMO_DATA := datasets_vg/datasets

demo: $(STAMP)
	test -d $(DEMO_DATA)/synthetic || $(PY) synthetic.py --out $(DEMO_DATA) --name synthetic
	$(PY) eval.py --datasets_folder $(DEMO_DATA) --dataset_name synthetic --resize 192 192 --exp_name demo \
		--num_workers 2 --save_predictions

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
