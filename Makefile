# Quickstart:  make demo   (install, then a small study on CPU: every method on real data, a table and report.html)
#              make test   (install, then the test suite)
VENV ?= .venv
ACT = . $(VENV)/bin/activate

.PHONY: install demo quickstart test test-fast clean
install:
	bash scripts/install.sh
	bash scripts/install_assets.sh

demo: install
	$(ACT) && peftlab sweep configs/studies/compare.yaml --preset-scale=cpu --cpu-runs 2

quickstart: install
	$(ACT) && peftlab train configs/quickstart/lm_lora.yaml --output.overwrite=true
	$(ACT) && peftlab train configs/quickstart/cls_lora.yaml --output.overwrite=true

test: install
	bash scripts/install_browser.sh
	$(ACT) && python -m pytest -q

test-fast: install
	$(ACT) && python -m pytest -q -m "not slow"

clean:
	rm -rf runs .pytest_cache
