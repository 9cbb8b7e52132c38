"""Skips for missing test dependencies that cannot hide in CI.

A test that needs an optional package skips on a developer's machine that lacks it; with
``CI=true`` it runs anyway and fails, so CI never passes by skipping what it should test.
"""

import importlib.util
import os
import shutil

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    return importlib.util.find_spec(module) is not None


def needs(present: bool, what: str) -> pytest.MarkDecorator:
    """Skip the test when ``present`` is false, except in CI, where it runs and fails."""
    return pytest.mark.skipif(
        not present and not IN_CI, reason=f"{what} missing: pip install -e '.[test]'"
    )


#: For tests that compile with inductor on the CPU, which builds C++.
needs_cxx = needs(shutil.which("g++") is not None, "a C++ compiler (inductor's CPU code)")
