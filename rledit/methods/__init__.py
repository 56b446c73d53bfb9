"""Editing methods, each registered by name (``get_method("rledit")``)."""

import rledit.methods.rledit  # noqa: F401  (registers "rledit" and "malmen")
from rledit.methods.base import (
    EditMethod,
    UpdateError,
    available_methods,
    check_updates,
    get_method,
    register_method,
)

__all__ = ["EditMethod", "UpdateError", "available_methods", "check_updates", "get_method", "register_method"]
