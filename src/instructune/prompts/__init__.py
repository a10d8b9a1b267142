"""Prompts: the template library, the Jinja sandbox, k-shot prompts and chat templates."""

from .format import Encoded, PromptFormat
from .library import LIBRARY, Template
from .template import Pair, TaskTemplate, build_task_template

__all__ = ["Encoded", "PromptFormat", "LIBRARY", "Template", "Pair", "TaskTemplate",
           "build_task_template"]
