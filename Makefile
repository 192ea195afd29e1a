.PHONY: test lint format bench

test:
	python -m pytest

lint:
	ruff check .
	ruff format --check .
	mypy

format:
	ruff format .
	ruff check --fix .

bench:
	python -m bench
