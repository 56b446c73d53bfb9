"""rledit: lifelong editing of language models with RL-trained hypernetwork editors."""

from rledit.types import EditRequest, EditRequestError, EditStep, PromptAnswer

__version__ = "0.1.0"

__all__ = ["EditRequest", "EditRequestError", "EditStep", "PromptAnswer", "__version__"]
