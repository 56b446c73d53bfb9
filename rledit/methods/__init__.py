"""Editing methods, each registered by name (``get_method("rledit")``)."""

from rledit.methods import (  # noqa: F401  (importing a method package registers its methods)
    alphaedit,
    ft,
    memit,
    mend,
    rledit,  # "rledit" and "malmen"
    ultraedit,
)
from rledit.methods.base import (
    EditMethod,
    UpdateError,
    available_methods,
    check_updates,
    get_method,
    register_method,
)

__all__ = ["EditMethod", "UpdateError", "available_methods", "check_updates", "get_method", "register_method"]
