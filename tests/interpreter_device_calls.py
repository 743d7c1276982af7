"""Device-function calls in Triton's CPU interpreter without re-patching ``triton.language``.

A kernel launch under ``TRITON_INTERPRET=1`` patches ``triton.language`` (every builtin, the tensor
class, ``tl.math``) for the launch and restores it after. Triton 3.6-3.8 also patch it again on each
call of a ``@triton.jit`` helper inside the kernel (``InterpretedFunction.__call__``), although the
launch's patch is in force; the repeated ``inspect.getmembers`` sweeps took about 40 % of the CPU
suite's interpreter time. :func:`install` makes a helper call patch only where a language module
its globals use is not patched yet, which is what the stock call would do in effect; on a Triton
whose call is not the one read here it installs nothing.
"""

from __future__ import annotations

import inspect

import triton.language as tl
from triton.runtime import interpreter

_STOCK_CALL_LINES = ("_patch_lang(self.fn)", "fn = self.rewrite()", "return fn(*args, **kwargs)")


def _patched(lang) -> bool:
    """Whether a launch's patch is in force on ``lang`` (``tl`` or ``tl.core``): its builtins are
    replaced by the interpreter's wrappers."""
    return not tl.core.is_builtin(lang.load)


def _languages(fn) -> list:
    return [v for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)]


def install() -> bool:
    """Replace ``InterpretedFunction.__call__`` (device-function calls) if it is the stock one;
    returns whether it did."""
    cls = getattr(interpreter, "InterpretedFunction", None)
    if cls is None or not hasattr(interpreter, "_patch_lang") or not hasattr(cls, "rewrite"):
        return False
    try:
        source = inspect.getsource(cls.__call__)
    except (OSError, TypeError):
        return False
    if not all(line in source for line in _STOCK_CALL_LINES):
        return False
    languages: dict = {}  # function -> the language modules its globals use

    def device_call(self, *args, **kwargs):
        langs = languages.get(self.fn)
        if langs is None:
            langs = languages[self.fn] = _languages(self.fn)
        if not all(_patched(lang) for lang in langs):
            interpreter._patch_lang(self.fn)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise interpreter.InterpreterError(repr(e)) from e

    cls.__call__ = device_call
    return True
