"""The runnable examples in the parallel.sequence docstrings stay runnable."""

import doctest
import importlib

import pytest

MODULES = [
    "parallel.sequence.data",
    "parallel.sequence.ring_attention",
    "parallel.sequence.ring_self_attention",
    "parallel.sequence.ulysses",
    "parallel.sequence.hf_attention",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    mod = importlib.import_module(name)
    res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert res.failed == 0, f"{res.failed} doctest failure(s) in {name}"
    assert res.attempted > 0
