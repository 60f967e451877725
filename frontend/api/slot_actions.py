"""POST /slots/{id_slot}?action=save|restore|erase, as llama-server answers it.

Without --slot-save-path every action is a 501; a slot id that is not a number, or names no
slot, an unknown action and a file name with a directory part are 400s; a file that cannot be
restored (missing, another model's, cut short, too big for the slot) is a 400; a node that fails
meanwhile is a 500. A slot busy with a request is waited for (llama-server defers the action until
the slot is free), up to --timeout, then a 503.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from llamarpc.proto.errors import BackendError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..engine import slot_file
from .errors import APIError, bad_request, error_response
from .schemas import SlotActionRequest
from .state import ServerState

BUSY_POLL = 0.05    # seconds between two tries on a busy slot


async def _when_idle(st: ServerState, fn: Callable[[], dict]) -> dict:
    deadline = time.monotonic() + st.settings.timeout
    while True:
        try:
            return await run_in_threadpool(fn)
        except slot_file.SlotBusy as e:
            if time.monotonic() >= deadline:
                raise APIError(503, f"{e}; gave up waiting for it", "unavailable_error") from None
            await asyncio.sleep(BUSY_POLL)
        except slot_file.SlotFileError as e:
            raise bad_request(str(e)) from None
        except BackendError as e:
            raise APIError(500, f"the slot's KV cache could not be moved: {e}", "server_error") from None


def _filename(r: SlotActionRequest | None) -> str:
    name = r.filename if r is not None else None
    if not slot_file.valid_filename(name):
        raise bad_request("Invalid filename")
    return name


async def slot_action(request: Request, st: ServerState, id_slot: str, r: SlotActionRequest | None) -> Response:
    directory = st.settings.slot_save_path
    if not directory:
        return error_response(501, "This server does not support slots action. Start it with `--slot-save-path`",
                              "not_supported_error")
    try:
        slot_id = int(id_slot, 10)
    except ValueError:
        raise bad_request("Invalid slot ID") from None
    if st.engine is None:
        raise APIError(503, "Loading model", "unavailable_error")
    engine = st.engine
    if not 0 <= slot_id < len(engine.slots):
        raise bad_request("Invalid slot ID")
    action = request.query_params.get("action", "")
    if action == "save":
        name = _filename(r)
        out = await _when_idle(st, lambda: slot_file.save(engine, slot_id, directory, name))
    elif action == "restore":
        name = _filename(r)
        try:
            out = await _when_idle(st, lambda: slot_file.restore(engine, slot_id, directory, name))
        except APIError as e:
            if e.code != 400:
                raise
            raise bad_request("Unable to restore slot, no available space in KV cache or invalid slot save "
                              f"file: {e.message}") from None
    elif action == "erase":
        out = await _when_idle(st, lambda: slot_file.erase(engine, slot_id))
    else:
        raise bad_request("Invalid action")
    return JSONResponse(out)
