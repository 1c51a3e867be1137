"""The project's own errors, and finding them inside the exceptions Ray wraps them in.

Every error the project raises on purpose derives from :class:`AlignmentError`; the ``alignment`` command
prints one as a single ``error:`` line (no traceback) and exits with its ``exit_code``. Anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import re

RUN_FAILED = 1  # the run itself failed
BAD_INPUT = 2  # the config, the data or a model cannot be used (also argparse's code for a bad command line)


class AlignmentError(Exception):
    """A failure the user can act on, said in one sentence that names the key, file, row or model."""

    exit_code = RUN_FAILED


class InputError(AlignmentError):
    """What the user gave (config, data, model) cannot be used: nothing was run, or what ran was wasted."""

    exit_code = BAD_INPUT


# A Ray Data task's own error reaches the driver only as text: Ray wraps it in UserCodeException, and the
# pickled copy drops __cause__. Its line in the remote traceback: "alignment.<module>.<Class>: <message>".
_ERROR_LINE = re.compile(r"^(alignment(?:\.\w+)+)\.(\w+): (.*)$", re.MULTILINE)
# Any other exception's line, but Ray's own (a bug raised after ours, while handling it, is not ours).
_OTHER_LINE = re.compile(r"^(?!ray\.|alignment\.)[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b", re.MULTILINE)


def _from_ray(exc: BaseException) -> bool:
    return type(exc).__module__.split(".")[0] == "ray"


def _wrapped(exc: BaseException) -> list[BaseException]:
    """The exceptions a Ray exception carries: a task's cause, a Train worker group's failures, a Train
    controller's failure, a worker exception kept with its traceback, and the Python chain."""
    inner = [getattr(exc, "cause", None), getattr(exc, "controller_failure", None), getattr(exc, "_base_exc", None)]
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict):
        inner += [failures[rank] for rank in sorted(failures)]
    inner += [exc.__cause__, exc.__context__]
    return [e for e in inner if isinstance(e, BaseException) and e is not exc]


def _from_text(text: str) -> AlignmentError | None:
    """The project's error named last in a remote traceback's text, unless another exception followed it."""
    for match in reversed(list(_ERROR_LINE.finditer(text))):
        if _OTHER_LINE.search(text, match.end()):
            return None
        module, name, message = match.groups()
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        if isinstance(cls, type) and issubclass(cls, AlignmentError):
            return cls(message)
    return None


def unwrap(exc: BaseException) -> BaseException:
    """The project's own error inside ``exc`` (itself if it is one, or if none is inside).

    Ray hands a driver the exception of a task, actor, Ray Train worker or Ray Tune trial wrapped in its own
    (``RayTaskError`` and its cause, ``WorkerGroupError`` and each worker's failure, ``ControllerError``,
    ``UserExceptionWithTraceback``), whose text is the whole remote traceback.
    """
    todo, seen, wrappers = [exc], set(), []
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        if not _from_ray(e):
            if isinstance(e, AlignmentError):
                return e
            continue  # a foreign exception's own chain is its own business
        wrappers.append(e)
        todo.extend(_wrapped(e))
    for e in wrappers:  # a cause lost in transit: the error named in the remote traceback's text
        found = _from_text(str(e))
        if found is not None:
            return found
    return exc
