"""Running a Generation to an HTTP response: whole (JSON) or streamed (SSE).

Both wait for the engine's first output before answering, so a request the engine refuses, or
an engine that is gone, still gets a proper HTTP status; after the headers are out, an error
travels as an SSE event with OpenAI's error body, followed by [DONE].
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from services.frontend.errors import APIError
from services.frontend.generation import ClientDisconnected, Generation
from services.frontend.openai_responses import SSE_DONE, error_event
from shared.processor.sequence import Sequence

log = logging.getLogger(__name__)

# nginx's code for "client closed the request": logged and counted, never seen by the client.
CLIENT_CLOSED = 499

ChunkWriter = Callable[[AsyncIterator[Sequence]], AsyncIterator[bytes]]


async def respond_whole(
    gen: Generation, request: Request, build: Callable[[list[Sequence]], Response]
) -> Response:
    """Run to completion and ``build`` the response from the sequences (in choice order); 499 if
    the client went away (everything was aborted)."""
    try:
        gen.start(request.receive)
        return build(await gen.collect())
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED)
    except Exception:
        gen.fail()
        raise
    finally:
        gen.close()


async def _chain(first: Sequence, rest: AsyncIterator[Sequence]) -> AsyncIterator[Sequence]:
    yield first
    async for seq in rest:
        yield seq


class _GenerationStream(StreamingResponse):
    """An SSE response that closes its Generation when it ends, however it ends: a client that
    leaves between chunks can leave the body iterator suspended, its ``finally`` not yet run."""

    def __init__(self, gen: Generation, body: AsyncIterator[bytes]):
        super().__init__(body, media_type="text/event-stream", headers={"cache-control": "no-cache"})
        self.gen = gen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.gen.close()


def sse(events: AsyncIterator[bytes]) -> StreamingResponse:
    """An SSE response of ``events`` (a background response's: its client leaving stops nothing)."""
    return StreamingResponse(events, media_type="text/event-stream", headers={"cache-control": "no-cache"})


async def stream(gen: Generation, request: Request, write_chunks: ChunkWriter) -> Response:
    """An SSE response whose events ``write_chunks`` makes from the sequence updates."""
    updates = gen.updates()
    try:
        gen.start(request.receive)
        first = await updates.__anext__()
    except ClientDisconnected:
        gen.close()
        return Response(status_code=CLIENT_CLOSED)
    except Exception:
        gen.fail()
        gen.close()
        raise
    except BaseException:  # cancelled: the client or the server is going away
        gen.close()
        raise

    async def body() -> AsyncIterator[bytes]:
        try:
            async for event in write_chunks(_chain(first, updates)):
                yield event
        except ClientDisconnected:
            return
        except APIError as exc:
            gen.fail()
            yield error_event(exc.body())
            yield SSE_DONE
        except Exception as exc:  # the headers are out: report in-band, keep the process alive
            log.exception("stream failed")
            gen.fail()
            yield error_event(APIError(500, f"Internal server error: {type(exc).__name__}").body())
            yield SSE_DONE
        finally:
            gen.close()  # synchronous: runs even when the response task is being cancelled

    return _GenerationStream(gen, body())
