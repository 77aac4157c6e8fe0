"""The runnable examples in the offload docstrings stay runnable."""

import doctest
import importlib

import pytest

MODULES = [
    "offload",
    "offload.chunk",
    "offload.search",
    "offload.tiers",
    "offload.precision",
    "offload.manager",
    "offload.optim",
    "offload.optim_lamb",
    "offload.trust",
    "offload.trust_fused",
    "offload.consolidate",
    "offload.nvme",
    "offload.staging",
    "offload.swap",
    "offload.lazy",
    "offload.timeline",
    "offload.tracer",
    "offload.pool",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    mod = importlib.import_module(name)
    res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert res.failed == 0, f"{res.failed} doctest failure(s) in {name}"
    assert res.attempted > 0
