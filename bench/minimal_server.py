"""The least a Python server adds around this model's pass: the floor under the overhead goal.

    python bench/overhead_ab.py --checkpoint runs/quickstart/checkpoint --rev . --minimal

Answers POST /recommend for a known user with a stored history as `cllm4rec serve` does, and nothing
else: a bare ASGI app on uvicorn (the same event loop and HTTP parser), the body read with json.loads,
the history read with one LRANGE from the same Redis keys (seeded as the server seeds them), the
server's own prompt, scoring (ServedModel.job and score: the forward pass, masking, top-k; on the event
loop's thread) and response encoding. No validation, middleware, key checks, batching, catalogue check,
deadline or error handling; the metrics are the forward pass's histogram, which overhead_ab reads.

On a machine where threads that fall asleep during a pass are slow to wake (a VM's idle virtual CPUs:
the client's, Redis's, the server's), a request costs more around a long pass than around an instant
one whatever the server; this measures that floor beside the real server (docs/benchmarks.md, "The
floor under the overhead goal"). Started by bench/serve_process.py as `python minimal_server.py serve
--checkpoint C --host H --port P`, with the server's CLLM4REC_* settings in the environment.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout this file is in

from service import metrics  # noqa: E402  (first: the service package sets the OpenMP wait policy before torch)
import torch  # noqa: E402
import uvicorn  # noqa: E402
from prometheus_client import generate_latest  # noqa: E402

from service.histories import RedisHistoryStore, seed_from_checkpoint  # noqa: E402
from service.served_model import Answer, ServedModel, latest_unique  # noqa: E402
from service.settings import Settings  # noqa: E402


def minimal_app(model: ServedModel, settings: Settings):
    store: RedisHistoryStore | None = None  # made on the server's event loop (redis.asyncio is bound to it)

    async def respond(send, status: int, body: bytes) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def recommend(receive) -> bytes:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = json.loads(body)
        history = model.indices(await store.redis.lrange(store.history_key(request["user_id"]), 0, -1))
        user = model.recommender.user_index[request["user_id"]]
        started = time.perf_counter()
        [(items, scores)] = model.score([model.job(user, latest_unique(history), sorted(set(history)),
                                                   request.get("k", 10))])
        metrics.model_forward_duration.observe(time.perf_counter() - started)
        return model.response_json(Answer(request["user_id"], items, scores, False, None, []))

    async def app(scope, receive, send) -> None:
        nonlocal store
        if scope["type"] == "lifespan":
            await receive()
            store = RedisHistoryStore(settings.redis_url, settings.redis_key_prefix, settings.history_max_length,
                                      settings.redis_timeout_s)
            await seed_from_checkpoint(store, model.recommender.checkpoint)
            model.score([model.warm_up_job()])
            await send({"type": "lifespan.startup.complete"})
            await receive()
            await store.close()
            await send({"type": "lifespan.shutdown.complete"})
        elif scope["path"] == "/recommend":
            await respond(send, 200, await recommend(receive))
        elif scope["path"] == "/metrics":
            await respond(send, 200, generate_latest())
        else:  # /readyz once the lifespan has started
            await respond(send, 200, b"{}")
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    settings = Settings()
    if not settings.redis_url:
        parser.error("CLLM4REC_REDIS_URL is needed: the floor is measured with the history in Redis")
    torch.set_num_threads(settings.resolved_torch_threads())
    model = ServedModel.load(args.checkpoint, settings)
    uvicorn.run(minimal_app(model, settings), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
