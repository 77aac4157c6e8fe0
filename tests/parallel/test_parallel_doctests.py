"""The runnable examples in the parallel docstrings stay runnable."""

import doctest
import importlib

import pytest

MODULES = [
    "parallel.comm",
    "parallel.topology",
    "parallel.tensor.sharding",
    "parallel.tensor.mappings",
    "parallel.tensor.linear_1d",
    "parallel.tensor.embedding_1d",
    "parallel.tensor.cross_entropy_1d",
    "parallel.policies",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    mod = importlib.import_module(name)
    res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert res.failed == 0, f"{res.failed} doctest failure(s) in {name}"
    assert res.attempted > 0
