"""A client's mistake is not a server error: BentoML's 4xx answers logged as one line, not an ERROR traceback.

BentoML answers a request that fails its input validation (pydantic's ValidationError, e.g. `top_k: "2"` on
/rerank) or raises a BentoMLException with a 4xx code with a 400, and logs it through
`bentoml._internal.server.http_app.log_exception`: at ERROR, with the whole traceback, as it does for a
real failure. The filter here rewrites those records to one WARNING line naming the path and the reason;
everything else (5xx, unexpected exceptions) keeps its level and traceback.
"""

from __future__ import annotations

import logging

BENTOML_LOGGER = "bentoml._internal.server.http_app"  # where log_exception writes


def client_error_status(exc: BaseException | None) -> int | None:
    """The 4xx status BentoML answers this exception with, or None when it is a server error."""
    from bentoml.exceptions import BentoMLException
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return 400
    if isinstance(exc, BentoMLException):
        status = int(exc.error_code.value)
        return status if 400 <= status < 500 else None
    return None


def describe(exc: BaseException) -> str:
    """What was wrong, without the values sent (a client's texts stay out of the log)."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        wrong = exc.errors(include_input=False, include_url=False)
        return "; ".join(f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}" for error in wrong)
    return str(exc)


class ClientErrorsAsWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        status = client_error_status(exc)
        if status is not None:
            reason = " ".join(describe(exc).split())  # one line: pydantic's message spans several
            record.msg = f"{record.getMessage()}: client error {status}: {type(exc).__name__}: {reason}"
            record.args = ()
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def log_client_errors_as_warnings() -> None:
    """Install the filter once (the worker calls it when the service starts)."""
    logger = logging.getLogger(BENTOML_LOGGER)
    if not any(isinstance(existing, ClientErrorsAsWarnings) for existing in logger.filters):
        logger.addFilter(ClientErrorsAsWarnings())
