# Quickstart:  make demo   (install, then a small study end to end on CPU)
#              make test   (install, then the test suite)
VENV ?= .venv
ACT = . $(VENV)/bin/activate

.PHONY: install demo test test-fast clean
install:
	bash scripts/install.sh

demo: install
	$(ACT) && peftlab train configs/quickstart/lm_lora.yaml --output.overwrite=true
	$(ACT) && peftlab train configs/quickstart/cls_lora.yaml --output.overwrite=true

test: install
	$(ACT) && python -m pytest -q

test-fast: install
	$(ACT) && python -m pytest -q -m "not slow"

clean:
	rm -rf runs .pytest_cache
