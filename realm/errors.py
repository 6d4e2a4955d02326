"""The one error vocabulary of Realm.

Every failure a user can cause or see is a `RealmError` subclass. Each class carries the
ABI error code a host function returns to a guest (docs/ABI.md lists them) and the HTTP
status the server answers with, so the mapping lives here and nowhere else.
"""

from __future__ import annotations


class RealmError(Exception):
    """Base of every error Realm reports to a user, a guest or a client."""

    abi_code: int = -1
    http_status: int = 500
    openai_type: str = "server_error"
    param: str | None = None  # the request field at fault, when one is (the error body's `param`)


class InvalidArgument(RealmError):
    """A caller passed a value that can never be valid (bad length, bad option)."""

    abi_code = -1
    http_status = 400
    openai_type = "invalid_request_error"


class OutOfBounds(RealmError):
    """A guest pointer or length reaches outside the guest's linear memory."""

    abi_code = -2
    http_status = 400
    openai_type = "invalid_request_error"


class UnknownModel(RealmError):
    """No model has this id or name (never stored, released, or not in the catalogue)."""

    abi_code = -3
    http_status = 404
    openai_type = "not_found_error"


class HashMismatch(RealmError):
    """The model id exists but its content hash is not the one the caller expects."""

    abi_code = -4
    http_status = 409
    openai_type = "invalid_request_error"


class PermissionDenied(RealmError):
    """The tenant may not use this model (or this resource)."""

    abi_code = -5
    http_status = 403
    openai_type = "permission_error"


class ModelFormatError(RealmError):
    """A model file is truncated, corrupt, or uses a type or architecture we do not run."""

    abi_code = -6
    http_status = 400
    openai_type = "invalid_request_error"


class Unsupported(RealmError):
    """The request is well formed but asks for something this host does not offer."""

    abi_code = -7
    http_status = 400
    openai_type = "invalid_request_error"


class ContextOverflow(RealmError):
    """The tokens would not fit in the model's (or the session's) context."""

    abi_code = -8
    http_status = 400
    openai_type = "invalid_request_error"


class LimitExceeded(RealmError):
    """A per-tenant or per-call limit was hit; retrying later may succeed."""

    abi_code = -9
    http_status = 429
    openai_type = "rate_limit_error"

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class GuestFault(RealmError):
    """The tenant's guest module trapped, ran out of time or memory, or broke the ABI."""

    abi_code = -10
    http_status = 502
    openai_type = "guest_error"


class BackendUnavailable(RealmError):
    """The asked-for compute backend does not exist on this host."""

    abi_code = -11
    http_status = 503
    openai_type = "server_error"


class NotFound(RealmError):
    """A session, handle or other named resource does not exist (or is not the caller's)."""

    abi_code = -12
    http_status = 404
    openai_type = "not_found_error"


class FetchError(RealmError):
    """Fetching a model from its package failed (network, missing file, wrong hash)."""

    abi_code = -13
    http_status = 502
    openai_type = "server_error"


class AbiVersionMismatch(RealmError):
    """A guest was built for another major version of the ABI."""

    abi_code = -14
    http_status = 502
    openai_type = "guest_error"


class Unauthorized(RealmError):
    """No API key, or one that matches no tenant. HTTP only: guests never see it."""

    abi_code = -5
    http_status = 401
    openai_type = "authentication_error"


class PayloadTooLarge(RealmError):
    """An HTTP request body over the server's size limit. HTTP only: guests never see it."""

    abi_code = -9
    http_status = 413
    openai_type = "invalid_request_error"


class MethodNotAllowed(RealmError):
    """The endpoint exists but not for this HTTP method. HTTP only: guests never see it."""

    abi_code = -7
    http_status = 405
    openai_type = "invalid_request_error"


class UnsupportedMediaType(RealmError):
    """A request body that is not declared as JSON (`Content-Type: application/json`). HTTP only."""

    abi_code = -7
    http_status = 415
    openai_type = "invalid_request_error"


class ServiceUnavailable(RealmError):
    """The server cannot take the request now (still loading, shutting down, no room to load
    its model, the replica serving it gone); retrying later may succeed. HTTP only."""

    abi_code = -15
    http_status = 503
    openai_type = "server_error"


class InternalError(RealmError):
    """A fault in Realm itself; the message is safe to show, details go to the log."""

    abi_code = -15
    http_status = 500
    openai_type = "server_error"


class Cancelled(RealmError):
    """The caller went away (client disconnected): the guest should stop and return."""

    abi_code = -16
    http_status = 499
    openai_type = "cancelled"


ABI_CODES: dict[int, type[RealmError]] = {
    cls.abi_code: cls
    for cls in (
        InvalidArgument,
        OutOfBounds,
        UnknownModel,
        HashMismatch,
        PermissionDenied,
        ModelFormatError,
        Unsupported,
        ContextOverflow,
        LimitExceeded,
        GuestFault,
        BackendUnavailable,
        NotFound,
        FetchError,
        AbiVersionMismatch,
        InternalError,
        Cancelled,
    )
}
"""ABI code -> exception class, for turning a guest's returned code back into an error."""
