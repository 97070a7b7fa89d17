"""Wire rules shared by the drivers, sans I/O: what an error answer means as a typed error.

The drivers parse the transport's own forms (a ``Retry-After`` date needs the clock) and call these.
"""

from __future__ import annotations

from collections.abc import Mapping

from yarl import URL

from anonjoin._core import constants as C
from anonjoin._core.events import Step
from anonjoin._core.models import parse_error_body
from anonjoin._exceptions import ServiceError

__all__ = ["service_error"]


def service_error(
    step: Step,
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    url: URL,
    crid: str | None,
    corr: str | None,
    retry_after: float | None,
) -> ServiceError:
    """An error status as a :class:`ServiceError`: code and subcode from the body (a 403 without one that
    the ``Warning`` or ``X-Ms-diagnostics`` header calls InvalidToken is InvalidToken), the status's
    standard code otherwise; ``retry_after`` (seconds) as the driver parsed it."""
    err = parse_error_body(body)
    code = err.code if err else None
    subcode = err.subcode if err else None
    warning = headers.get("Warning")
    diag = headers.get("X-Ms-diagnostics")
    if (
        subcode is None
        and status == 403
        and ((warning and "InvalidToken" in warning) or (diag and diag.lstrip().startswith("28055")))
    ):
        subcode = "InvalidToken"
    if code is None:
        code = C.ERROR_CODES.get(status)
    return ServiceError(
        step=step,
        status=status,
        code=code,
        subcode=subcode,
        message=err.message if err else None,
        correlation_id=corr,
        client_request_id=crid,
        retry_after=retry_after,
        body=body,
        url=url,
        warning=warning,
    )
