"""Shared fixtures: real models are loaded once per test session."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct (LLaMA architecture, 30 layers), loaded once."""
    from causalpatch import InterpretableModel

    return InterpretableModel("smollm2")
