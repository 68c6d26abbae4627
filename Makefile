# Quickstart:  make demo   (install, then a real LoRA/DoRA/SoRA/BA-LoRA/rSVD comparison on CPU)
#              make test   (install, then the test suite)
VENV ?= .venv
ACT = . $(VENV)/bin/activate

.PHONY: install demo quickstart test test-fast clean
install:
	bash scripts/install.sh
	bash scripts/install_assets.sh

demo: install
	$(ACT) && peftlab compare --output-dir runs/compare

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
