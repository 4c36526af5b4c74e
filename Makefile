# make-style entry points (each is one jaxspec command; see README.md)
PY ?= python

.PHONY: test draft prompts

test:
	$(PY) -m pytest -m "not slow and not gpu"

# The distilled draft of the default model, in <cache>/smollm2-135m/draft (a no-op once built;
# an interrupted build resumes). About an hour on one CPU core.
draft:
	jaxspec train-draft

# Regenerate the distillation prompt corpus (deterministic).
prompts:
	$(PY) scripts/make_distill_prompts.py
