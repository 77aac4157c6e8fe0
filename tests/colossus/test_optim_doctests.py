"""The runnable examples in the colossus.optim docstrings stay runnable."""

import doctest
import importlib

import pytest

MODULES = [
    "colossus.optim",
    "colossus.optim.flat",
    "colossus.optim.groups",
    "colossus.optim.lamb",
    "colossus.optim.lars",
    "colossus.optim.reducer",
    "colossus.optim.scaling",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    mod = importlib.import_module(name)
    res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert res.failed == 0, f"{res.failed} doctest failure(s) in {name}"
    assert res.attempted > 0
