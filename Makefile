.PHONY: test lint format bench

test:
	python -m pytest

lint:
	ruff check poolq workers tests
	ruff format --check poolq workers tests
	mypy

format:
	ruff format poolq workers tests
	ruff check --fix poolq workers tests

bench:
	python -m bench
