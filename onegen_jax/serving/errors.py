"""The server's failures as the routes answer them: a client error (an HTTP 4xx status and a
one-line reason) and an internal error (named by the id its traceback is logged under)."""

from __future__ import annotations

import uuid


class ClientError(Exception):
  """A request refused: status (an HTTP 4xx code, or 503 while draining) and a one-line reason."""

  def __init__(self, status: int, reason: str):
    super().__init__(reason)
    self.status = status


class InternalError(Exception):
  """An engine failure, named by the id logged with its traceback."""

  def __init__(self, error_id: str):
    super().__init__(error_id)
    self.error_id = error_id


def new_error_id() -> str:
  """The id an internal error is answered and logged under."""
  return f"err-{uuid.uuid4().hex[:12]}"
