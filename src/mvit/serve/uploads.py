"""Reading a request's multipart form into memory, within the limits, and refusing it in one sentence.

Uploaded images are never written to disk: the body is counted as it streams in and refused with 413
once it passes the limit, so every file part fits the in-memory buffer the form parser is given.
Every refusal is an `ApiError`: an HTTP status, one sentence, and the headers that go with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Optional

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

MAX_FIELDS = 32  # non-file fields (head, abstain, ...) in one form
MAX_FIELD_BYTES = 4096  # each


class ApiError(Exception):
    """A request mvit refuses: the status, one sentence for the client, and extra response headers."""

    def __init__(self, status: int, sentence: str, headers: Optional[dict[str, str]] = None):
        super().__init__(sentence)
        self.status, self.sentence, self.headers = status, sentence, headers or {}


@dataclass(frozen=True)
class Upload:
    """One uploaded file, held in memory."""

    name: str  # the file name the client gave, or `<field> <n>` when it gave none
    data: bytes


@dataclass(frozen=True)
class Form:
    files: dict[str, list[Upload]]  # field -> its files, in the order sent
    values: dict[str, list[str]]  # field -> its text values, in the order sent

    def value(self, field: str) -> Optional[str]:
        """The one value of a field sent at most once."""
        found = self.values.get(field, [])
        if len(found) > 1:
            raise ApiError(422, f"the field `{field}` was sent {len(found)} times; send it once")
        return found[0] if found else None

    def flag(self, field: str) -> bool:
        value = self.value(field)
        if value is None or value.lower() in ("", "false", "0", "no", "off"):
            return False
        if value.lower() in ("true", "1", "yes", "on"):
            return True
        raise ApiError(422, f"the field `{field}` is true or false, got {value!r}")


async def read_form(request: Request, *, max_bytes: int, max_files: int, timeout_s: float) -> Form:
    """The request's multipart form, refused (ApiError) when it is not one, is over `max_bytes`,
    holds more than `max_files` files, has not all arrived within `timeout_s` (408: a client that
    stalls mid-body must not hold its place in the queue), or ends before its closing boundary."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(415, f"send the images as multipart/form-data (got {content_type or 'no content type'}), e.g. curl -F images=@lesion.jpg")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)  # refused before a byte of it is read
    body = _Body(request.stream(), max_bytes, _closing_delimiter(content_type))
    parser = MultiPartParser(request.headers, body.chunks(), max_files=max_files,
                             max_fields=MAX_FIELDS, max_part_size=MAX_FIELD_BYTES)
    parser.spool_max_size = max_bytes + 1  # a file part is never larger than the body: it stays in memory
    try:
        parsed = await asyncio.wait_for(parser.parse(), timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request's body did not arrive within {timeout_s:g} s; send it again "
                            f"(over a slow link, ask for a longer --body-timeout-s)", {"Connection": "close"}) from None
    except MultiPartException as error:
        raise ApiError(400 if "files" not in error.message else 413, f"the form could not be read: {_sentence(error.message)}") from None
    except ClientDisconnect:
        raise ApiError(400, "the client closed the connection before the request was complete") from None
    files: dict[str, list[Upload]] = {}
    values: dict[str, list[str]] = {}
    try:
        if not body.closed:  # the parser returns what it has: the last part, cut short, would be lost in silence
            raise ApiError(400, "the form ended before its closing boundary, so the upload was cut short; send it again")
        for field, item in parsed.multi_items():
            if isinstance(item, UploadFile):
                found = files.setdefault(field, [])
                found.append(Upload(item.filename or f"{field} {len(found) + 1}", item.file.read()))
            else:
                values.setdefault(field, []).append(item)
    finally:
        await parsed.close()
    return Form(files, values)


class _Body:
    """The body's chunks, refused with 413 as soon as they add up to more than `max_bytes`; `closed`
    once the form's closing delimiter (`--BOUNDARY--`) has gone by."""

    def __init__(self, stream: AsyncIterator[bytes], max_bytes: int, delimiter: Optional[bytes]):
        self.stream, self.max_bytes, self.delimiter = stream, max_bytes, delimiter
        self.closed = delimiter is None  # no boundary: the parser refuses the form itself
        self.tail = b""  # the end of what came, in case the delimiter is split between two chunks

    async def chunks(self) -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in self.stream:
            seen += len(chunk)
            if seen > self.max_bytes:
                raise _too_large(self.max_bytes)
            if not self.closed:
                window = self.tail + chunk
                self.closed = self.delimiter in window
                self.tail = window[-len(self.delimiter):]
            yield chunk


def _closing_delimiter(content_type: str) -> Optional[bytes]:
    """`--BOUNDARY--`, from the multipart content type's boundary parameter (None without one)."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    return b"--" + boundary + b"--" if boundary else None


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(413, f"the request is larger than this server's limit of {max_bytes / 2**20:.3g} MiB; send fewer or smaller images")


def _sentence(message: str) -> str:
    """The form parser's words ("Too many files. Maximum number of files is 64.") as part of one sentence."""
    message = message.strip().rstrip(".").replace(". ", "; ")
    return message[:1].lower() + message[1:]
