"""Multipart uploads parsed as they stream in, so a size limit stops a file before it is all received."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from service.errors import ApiError
from service.storage import Store

MAX_FIELD_BYTES = 4096
MAX_FIELDS = 16


@dataclass
class Upload:
    """The parsed form: small text fields, and the one file part written to a temporary file."""

    fields: dict[str, str] = field(default_factory=dict)
    file_path: Path | None = None
    filename: str | None = None
    size: int = 0
    sha256: str = ""

    def discard(self) -> None:
        if self.file_path is not None:
            self.file_path.unlink(missing_ok=True)


async def receive_form(request: Request, store: Store, limit: int, file_field: str = "file") -> Upload:
    """Parse a ``multipart/form-data`` body; the part ``file_field`` goes to disk, at most ``limit`` bytes.

    Raises:
        ApiError: 413 over the limit (checked on Content-Length first, then while streaming), 422 for
        a malformed body or a missing file part.
    """
    import hashlib

    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise ApiError(415, "send multipart/form-data with a 'file' part")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit + 1_000_000:
        raise ApiError(413, f"upload of {declared} bytes is larger than the limit of {limit} bytes "
                       "(SLIMCONV_MAX_UPLOAD_BYTES)")
    upload = Upload()
    state: dict[str, Any] = {"headers": {}, "name": None, "buf": bytearray(), "out": None, "hdr": b"", "val": b""}
    digest = hashlib.sha256()

    def on_part_begin() -> None:
        state.update(headers={}, name=None, buf=bytearray(), out=None, hdr=b"", val=b"")

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["hdr"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["val"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["hdr"].lower()] = state["val"]
        state["hdr"], state["val"] = b"", b""

    def on_headers_finished() -> None:
        _, disp = parse_options_header(state["headers"].get(b"content-disposition", b""))
        name = disp.get(b"name", b"").decode("utf-8", "replace")
        state["name"] = name
        if name == file_field:
            if upload.file_path is not None:
                raise ApiError(422, f"more than one '{file_field}' part")
            upload.filename = disp.get(b"filename", b"").decode("utf-8", "replace")[:200] or None
            upload.file_path = store.temp_path()
            state["out"] = upload.file_path.open("wb")
        elif len(upload.fields) >= MAX_FIELDS:
            raise ApiError(422, "too many form fields")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        out: IO[bytes] | None = state["out"]
        if out is not None:
            upload.size += len(chunk)
            if upload.size > limit:
                raise ApiError(413, f"upload larger than the limit of {limit} bytes (SLIMCONV_MAX_UPLOAD_BYTES)")
            digest.update(chunk)
            out.write(chunk)
        else:
            state["buf"] += chunk
            if len(state["buf"]) > MAX_FIELD_BYTES:
                raise ApiError(422, f"form field {state['name']!r} is longer than {MAX_FIELD_BYTES} bytes")

    def on_part_end() -> None:
        if state["out"] is not None:
            state["out"].close()
            state["out"] = None
        elif state["name"]:
            try:
                upload.fields[state["name"]] = bytes(state["buf"]).decode("utf-8")
            except UnicodeDecodeError:
                raise ApiError(422, f"form field {state['name']!r} is not UTF-8 text") from None

    parser = MultipartParser(params[b"boundary"], {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished,
        "on_part_data": on_part_data, "on_part_end": on_part_end,
    })
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except ApiError:
        _close(state)
        upload.discard()
        raise
    except ClientDisconnect:
        _close(state)
        upload.discard()
        raise ApiError(400, "the client disconnected before the upload was complete") from None
    except Exception as exc:  # noqa: BLE001 - python-multipart raises several types for bad bodies
        _close(state)
        upload.discard()
        raise ApiError(422, f"malformed multipart body: {exc}") from None
    _close(state)
    if upload.file_path is None:
        raise ApiError(422, f"no '{file_field}' part in the form")
    if upload.size == 0:
        upload.discard()
        raise ApiError(422, "the uploaded file is empty")
    upload.sha256 = digest.hexdigest()
    upload.file_path.chmod(0o644)
    return upload


def _close(state: dict[str, Any]) -> None:
    if state.get("out") is not None:
        state["out"].close()
        state["out"] = None


def multipart_body(fields: dict[str, tuple[str, str]], required: list[str],
                   patterns: dict[str, str] | None = None) -> dict[str, Any]:
    """OpenAPI ``requestBody`` for a streamed multipart form: ``{name: (type or "binary", description)}``."""
    props = {name: ({"type": "string", "format": "binary"} if kind == "binary" else {"type": kind})
             | {"description": desc} | ({"pattern": patterns[name]} if patterns and name in patterns else {})
             for name, (kind, desc) in fields.items()}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "properties": props, "required": required}}}}}
