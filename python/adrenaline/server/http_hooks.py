"""Fixes to the 4xx answers of SGLang's HTTP front end, installed on its app before it starts.

- A body that fails validation: SGLang's handler answers with ``str(exc)``, which names a server
  file (``File ".../http_server.py", line ...``), and for deeply nested JSON fails itself with a
  RecursionError (HTTP 500). Ours answers 400 with a ``field: problem`` digest, in the same shape.
- ``/generate`` with both ``text`` and ``input_ids``: SGLang silently uses ``input_ids``; we answer
  400, since the client cannot know which prompt was served.

SGLang's own ValueErrors from the TokenizerManager (prompt too long, empty messages...) reach the
client unchanged: they carry no paths.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

MAX_MESSAGE_CHARS = 1000


def validation_digest(errors: list[dict[str, Any]]) -> str:
    """``loc: msg (detail)`` for each error; never the offending input (it may be huge or deep)."""
    parts = []
    for err in errors:
        loc = [p for p in err.get("loc", ()) if p != "body"]
        msg = str(err.get("msg", "invalid value"))
        detail = (err.get("ctx") or {}).get("error")
        if isinstance(detail, str):
            msg = f"{msg} ({detail})"
        if err.get("type") == "json_invalid":  # loc is the byte offset
            parts.append(f"{msg} at byte {loc[0]}" if loc else msg)
        else:
            parts.append(f"{'.'.join(map(str, loc))}: {msg}" if loc else msg)
    text = "; ".join(parts) or "invalid request"
    return text if len(text) <= MAX_MESSAGE_CHARS else text[:MAX_MESSAGE_CHARS] + "..."


def both_prompts_error(body: Any) -> str | None:
    if isinstance(body, dict) and body.get("text") is not None and body.get("input_ids") is not None:
        return "give either text or input_ids, not both"
    return None


def install() -> None:
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import ORJSONResponse
    from sglang.srt.entrypoints import http_server
    from sglang.srt.entrypoints.openai.protocol import ErrorResponse

    app = http_server.app
    sglang_handler = app.exception_handlers[RequestValidationError]

    async def on_validation_error(request, exc: RequestValidationError):
        route = request.url.path.removeprefix(request.scope.get("root_path", ""))
        if route.startswith("/v1/messages") or route == "/v1/systemone":
            return await sglang_handler(request, exc)  # these already leave paths and inputs out
        bad = HTTPStatus.BAD_REQUEST
        err = ErrorResponse(message=validation_digest(exc.errors()), type=bad.phrase, code=bad.value)
        content = err.model_dump()
        if route.startswith("/v1/responses"):  # OpenAI's Responses API nests the error
            content = {"error": {k: content[k] for k in ("message", "type", "param", "code")}}
        return ORJSONResponse(status_code=bad.value, content=content)

    app.exception_handlers[RequestValidationError] = on_validation_error
    sglang_contract_error = http_server.generate_contract_error
    http_server.generate_contract_error = lambda body: sglang_contract_error(body) or both_prompts_error(body)
