# Fresh machine: `make demo` (set-up, demo data, the whole pipeline) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DIR := data/demo

.PHONY: setup java rhino chromium test test-fast demo demo-data quickstart bench clean-demo

setup: $(VENV)/.installed java rhino

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@

# Java runs pycocoevalcap's PTB tokenizer and METEOR. Install it when we can; otherwise say so (eval explains too).
java:
	@command -v java >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "java not found: installing default-jre-headless"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jre-headless >/dev/null) \
	      || echo "WARNING: could not install Java; language evaluation needs it (or use --language_eval 0)"; \
	  else \
	    echo "WARNING: java not found; install a JRE (Debian: apt-get install default-jre-headless) for language evaluation"; \
	  fi; }

# SPICE on Java 15+ needs a JavaScript engine (Nashorn is gone): Debian's librhino-java (/usr/share/java/js.jar).
rhino: java
	@[ -f /usr/share/java/js.jar ] || ls coco-caption/spice-lib/js*.jar coco-caption/spice-lib/rhino*.jar >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "JavaScript engine for SPICE not found: installing librhino-java"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq librhino-java >/dev/null 2>&1) \
	      || echo "WARNING: could not install librhino-java; SPICE on Java 15+ needs it (see coco-caption/README.md)"; \
	  else \
	    echo "WARNING: no JavaScript engine for SPICE on Java 15+: install librhino-java (Debian) or put a Rhino js.jar in coco-caption/spice-lib/"; \
	  fi; }

# Headless Chromium opens the caption viewer in tests/test_viewer.py (those tests skip, saying why, without it).
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || command -v google-chrome >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "chromium not found: installing it for the viewer's browser tests"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1) \
	      || echo "WARNING: could not install chromium; the viewer's browser tests will be skipped"; \
	  else \
	    echo "WARNING: chromium not found; the viewer's browser tests will be skipped (Debian: apt-get install chromium)"; \
	  fi; }

test: setup chromium
	$(PY) -m pytest -q tests

# The fast half (about a minute on 2 cores): everything but the tests marked slow (pytest.ini).
test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

demo-data: setup
	$(PY) scripts/make_demo_data.py --output_dir $(DEMO_DIR)

demo: demo-data
	$(PY) scripts/run_demo.py

# The README's quick start: train a tiny SAT K=2 for one epoch on the demo data, evaluate it, write the viewer.
# QUICK_FLAGS adds train.py flags (the README test passes a few iterations).
QUICK_FLAGS ?=
quickstart: demo-data
	$(PY) train.py --cfg configs/quickstart.yml $(QUICK_FLAGS)
	$(PY) eval.py --model save/quickstart/model-best.pth --split test --batch_size 50
	$(PY) scripts/make_viewer.py --runs vis/quickstart.json --scores eval_results/quickstart_test.json \
	    --names quickstart --ref_json data/demo/captions_demo.json --output vis/quickstart.html
	@echo "open vis/quickstart.html in a browser (file://$(CURDIR)/vis/quickstart.html)"

bench: setup
	$(PY) bench/run_all.py

clean-demo:
	rm -rf $(DEMO_DIR) save/demo-* save/quickstart vis eval_results
