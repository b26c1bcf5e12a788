# `make demo`: the whole pipeline on the bundled sample, then the web page.
# `make test`: the whole test suite. Both create .venv and install what they need.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
CHROMIUM := /usr/bin/chromium

# Small enough for a CPU: the bundled 180-image demo sample, 5 epochs. Its 50/20/30 split leaves
# 54 test images (18 melanomas), so the test ROC AUC's interval can tell the model from chance.
DEMO_EPOCHS ?= 5

.PHONY: demo test lint browser clean bench-quality bench-tuning bench-tuning-40 bench-tuning-lite0 bench-trust

$(INSTALLED): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

# Debian's Chromium for the browser test (Playwright cannot download its own browser here).
browser:
	@test -x $(CHROMIUM) || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

# Fine-tunes EfficientNet-Lite0 from the ImageNet weights its pip package ships: no download.
demo: $(INSTALLED)
	$(PY) prepdata.py --csv sample_data/demo/GroundTruth.csv --images sample_data/demo/images \
		--out prepared_dataset --overwrite --split 0.5 0.2 0.3
	$(PY) model.py --data prepared_dataset --arch efficientnet_lite0 --weights imagenet \
		--epochs $(DEMO_EPOCHS) --batch-size 16 --accumulation-steps 1
	$(PY) analysis.py --model best_model.pth --data prepared_dataset/test --out results
	$(PY) app.py --model best_model.pth

# The full-scale run on ../shared/data/ham10000_300: ours and lite0 for 40 training minutes each
# (epochs planned from costs measured on the machine), the original recipe for 4 epochs, one split.
bench-quality: $(INSTALLED)
	$(PY) bench/bench_quality.py --docs docs/quality

# How bench-quality's recipe was chosen, on validation only, at equal wall time: the second round
# (options over the previous recipe, 13 training minutes per candidate).
bench-tuning: $(INSTALLED)
	$(PY) bench/bench_tuning.py

# The third round: alternatives to ours at its own budget (bench-quality plans 93% of 40 minutes),
# on validation only: more, smaller epochs, and a train/ balanced with augmented copies.
bench-tuning-40: $(INSTALLED)
	$(PY) bench/bench_tuning.py --work bench_runs/tuning40 --budget 37.2 --baseline progressive \
		--candidates progressive small_progressive balanced_progressive

# The fourth round: fine-tuning Lite0 from its pip ImageNet weights (warm-up and size), 20 training
# minutes per candidate, fp32 (bf16 was slower on the CPU it ran on); then `--seed 2` for finalists.
bench-tuning-lite0: $(INSTALLED)
	$(PY) bench/bench_tuning.py --work bench_runs/tuning_lite0 --budget 20 --baseline lite0 \
		--candidates lite0 lite0_short_warmup lite0_176 --amp off

# Does the out-of-distribution flag catch images that are not skin lesions, and what does
# calibration change on the test split? For the checkpoint `make bench-quality` trained ("ours")
# and its test split (web-page screenshots need `make browser`; without it they are skipped).
bench-trust: $(INSTALLED)
	$(PY) bench/bench_trust.py

test: $(INSTALLED) browser
	$(PY) -m pytest

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .

clean:
	rm -rf prepared_dataset results best_model.pth last_checkpoint.pth training_history.json
