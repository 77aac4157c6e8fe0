"""The runnable examples in the docstrings of the multi-dimensional tensor-parallel modules."""

import doctest
import importlib

import pytest

MODULES = [
    "parallel.tensor",
    "parallel.tensor.grid",
    "parallel.tensor.grid_ops",
    "parallel.tensor.linear_2d",
    "parallel.tensor.linear_2p5d",
    "parallel.tensor.linear_3d",
    "parallel.tensor.layernorm_nd",
    "parallel.tensor.embedding_nd",
    "parallel.tensor.cross_entropy_nd",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    mod = importlib.import_module(name)
    res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert res.failed == 0, f"{res.failed} doctest failure(s) in {name}"
    assert res.attempted > 0
