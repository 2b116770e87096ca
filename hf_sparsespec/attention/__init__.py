"""PillarAttn: the registered attention function, its reference implementation and token selection."""

from .context import StepContext, get_step_context, step_context
from .interface import ATTENTION_NAME, register_attention, sparsespec_attention

__all__ = ["ATTENTION_NAME", "StepContext", "get_step_context", "register_attention", "sparsespec_attention", "step_context"]
