# `make demo` and `make test` each create .venv when missing, install, and run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-gpu clean

install: $(VENV)/.installed

# Torch first: with no CUDA GPU, the CPU build (a local wheel when one is on disk, else PyTorch's CPU index),
# so set-up is minutes rather than a multi-GB CUDA download; a torch already in the venv is kept as it is.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "keeping the installed torch"; \
	elif nvidia-smi -L >/dev/null 2>&1; then \
		echo "CUDA GPU found: installing torch with CUDA"; \
		$(PY) -m pip install torch; \
	else \
		echo "no CUDA GPU: installing the CPU build of torch $(TORCH_VERSION)"; \
		$(PY) -m pip install "torch==$(TORCH_VERSION)+cpu" 2>/dev/null \
		|| $(PY) -m pip install "torch==$(TORCH_VERSION)+cpu" --index-url $(TORCH_CPU_INDEX) --extra-index-url https://pypi.org/simple; \
	fi
	$(PY) -m pip install -e ".[dev]"
	touch $@

# The demo: a real pretrained model (SmolLM2-135M-Instruct, 93 MB from PyPI) QLoRA-trained on our Python tasks on CPU,
# then one answer and what it learned: held-out loss and pass@1 of the tuned model against its base, and the time of
# each step (docs/real-model.md: 240 s on an idle 2-core EPYC, 40 min on a loaded one). Run again, it resumes: fetch
# and train find their work done, eval resumes in RUN/eval (`qlora report` and the model card read it there); a run
# retrained with other weights is not evaluated over that eval: eval refuses in one line.
DEMO_RUN := runs/smollm2-code
demo: install
	@set -e; start=$$(date +%s); took=""; load=$$(uptime | sed 's/.*averages*: //'); \
	timed() { begun=$$(date +%s); echo "+ qlora $$*"; $(VENV)/bin/qlora "$$@"; \
		took="$$took$$(printf '\n  %-9s %4d s' "$$1" $$(( $$(date +%s) - begun )))"; }; \
	timed fetch smollm2-135m models/smollm2-135m; \
	timed check configs/smollm2-code.yaml; \
	timed train configs/smollm2-code.yaml; \
	timed generate $(DEMO_RUN) --prompt "Return the second largest distinct number in a list, or None if there is none."; \
	timed eval $(DEMO_RUN) --out $(DEMO_RUN)/eval --compare-base --loss src/qlora/sample_data/heldout_tasks.json \
		--problems src/qlora/sample_data/eval_problems.jsonl --allow-code-execution --temperature 0 --max-new-tokens 256; \
	echo "make demo: $$(( $$(date +%s) - start )) s on $$(getconf _NPROCESSORS_ONLN) CPU cores, load average $$load before it$$took"

test: install
	$(PY) -m pytest -q -m "not gpu"

# On a machine with a CUDA GPU: the GPU paths (tests/test_gpu.py); each test says why it skips where it cannot run.
test-gpu: install
	$(PY) -m pytest -q -rs -m gpu

clean:
	rm -rf $(VENV) runs models
