"""The `cllm4rec` command: offline subcommands from model.cli, online ones from here.

    cllm4rec serve [--checkpoint PATH] [--host H] [--port P]     the HTTP server (service.app)
    cllm4rec load-histories --checkpoint PATH [--redis-url URL]  seed Redis with training histories
    cllm4rec quickstart [--dir D] [--host H] [--port P]          generate data, train a small model, serve it
    cllm4rec quickstart --no-serve [--dir D]                     only build (or reuse) that model

Options left out come from the CLLM4REC_* environment (service.settings). The service package sets
OMP_WAIT_POLICY before anything here imports torch (service/__init__.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import uvicorn
from pydantic import ValidationError

from model import cli as model_cli
from model.backbone import BackboneError
from model.checkpoint import CheckpointError, read_checkpoint
from model.data import DataError
from model.synthetic import write_synthetic_dataset
from model.config import ConfigError, TrainConfig
from model.train import STATE_DIR, train
from service.app import begin_shutdown, create_app
from service.engine import ReloadFailed
from service.served_model import ServedModel
from service.histories import HistoryStoreUnavailable, RedisHistoryStore, checkpoint_histories
from service.settings import Settings

log = logging.getLogger(__name__)

USER_ERRORS = (DataError, CheckpointError, BackboneError, ConfigError, HistoryStoreUnavailable, ValidationError)

# The quickstart's model: the real SmolLM2 backbone cut to 4 layers, recommendation finetuning only,
# on the generated data without reviews (the stages before it pay off over many epochs, which a CPU
# budget does not have). docs/serving.md has its cost and quality.
QUICKSTART_TRAINING = dict(backbone_layers=4, content_epochs=0, pretrain_epochs=0, finetune_epochs=8, batch_size=32,
                           finetune_lr=1e-2, finetune_targets="all", finetune_content=False, val_users=0)


def settings_from(**options) -> Settings:
    """Settings from the environment, with the options given on the command line on top."""
    return Settings(**{name: value for name, value in options.items() if value is not None})


# --- serve -----------------------------------------------------------------------------------------

class Server(uvicorn.Server):
    """uvicorn's server, with /readyz failing from the moment SIGTERM (or Ctrl-C) arrives, before
    the drain of in-flight requests begins; SIGHUP reloading the configured checkpoint; a banner
    once the app is ready; and a stop with exit status 1 (on_fatal) when the replica can no longer
    serve (its forward-pass worker died), so that its supervisor restarts it."""

    def __init__(self, config: uvicorn.Config, banner: str | None = None):
        super().__init__(config)
        self.banner = banner
        self.reloads: set[asyncio.Task] = set()  # referenced until done (the loop keeps only weak references)
        self.fatal = False
        config.app.state.on_fatal = self.stop_fatally

    def stop_fatally(self) -> None:
        """The replica cannot serve any more (its forward-pass worker died): unready at once, drain,
        exit with status 1 so that the supervisor restarts it."""
        self.fatal = True
        begin_shutdown(self.config.app)
        self.should_exit = True

    def handle_exit(self, sig, frame) -> None:
        begin_shutdown(self.config.app)
        super().handle_exit(sig, frame)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if not self.started:
            return
        # Signal handlers can only be set from the main thread (tests run servers in other threads).
        if hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread():
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reload_on_sighup)
        if self.banner:
            print(self.banner, flush=True)

    def reload_on_sighup(self) -> None:
        task = asyncio.get_running_loop().create_task(self.reload_configured_checkpoint())
        self.reloads.add(task)
        task.add_done_callback(self.reloads.discard)

    async def reload_configured_checkpoint(self) -> None:
        app = self.config.app
        try:
            await app.state.engine.reload(app.state.settings.checkpoint)
        except ReloadFailed as e:  # the engine logged the success, or a traceback if it was unexpected
            log.error("SIGHUP: %s", e)


def run_until_stopped(server: Server) -> None:
    """server.run(), ending normally after a clean drain. uvicorn re-raises SIGTERM and SIGINT once it
    has shut down gracefully, under the handlers that were in place before it started; these are
    no-ops here, so the process exits 0 instead of dying of the signal (143, or a KeyboardInterrupt)."""
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve(settings: Settings, banner: str | None = None) -> int:
    if settings.checkpoint is None:
        raise ConfigError("no checkpoint to serve: pass --checkpoint or set CLLM4REC_CHECKPOINT")
    logging.getLogger().setLevel(settings.log_level.upper())
    # Loaded before anything listens: a missing, corrupt or incompatible checkpoint (or backbone) is
    # one line naming the problem and exit status 2 (main), not a start-up traceback.
    model = ServedModel.load(settings.checkpoint, settings)
    app = create_app(settings, model)
    del model  # the app holds it; a reload must be able to free it
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            access_log=settings.log_level == "debug",  # per-request lines cost CPU; metrics count
                            timeout_graceful_shutdown=settings.shutdown_timeout_s,
                            limit_concurrency=settings.limit_concurrency or None)
    server = Server(config, banner)
    run_until_stopped(server)
    return 0 if server.started and not server.fatal else 1


def add_serve_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve recommendations over HTTP (settings: CLLM4REC_* variables, "
                              "docs/serving.md)")
    p.add_argument("--checkpoint", help="checkpoint directory (default: $CLLM4REC_CHECKPOINT)")
    p.add_argument("--host", help="interface to listen on (default: $CLLM4REC_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (default: $CLLM4REC_PORT or 8000)")
    p.set_defaults(func=lambda args: serve(settings_from(checkpoint=args.checkpoint, host=args.host, port=args.port)))


# --- load-histories ----------------------------------------------------------------------------------

def run_load_histories(args) -> int:
    settings = settings_from(checkpoint=args.checkpoint, redis_url=args.redis_url)
    if settings.checkpoint is None:
        raise ConfigError("pass --checkpoint or set CLLM4REC_CHECKPOINT")
    if not settings.redis_url:
        raise ConfigError("no Redis to load into: pass --redis-url or set CLLM4REC_REDIS_URL (without Redis the "
                          "server keeps histories in its own process and seeds them itself)")
    checkpoint = read_checkpoint(settings.checkpoint)

    async def load() -> int:
        store = RedisHistoryStore(settings.redis_url, settings.redis_key_prefix, settings.history_max_length,
                                  settings.redis_timeout_s, settings.history_ttl_s)
        try:
            return await store.seed(checkpoint_histories(checkpoint), checkpoint.model_version)
        finally:
            await store.close()

    started = time.perf_counter()
    written = asyncio.run(load())
    print(f"{written} of {len(checkpoint.user_ids)} users' histories changed in "
          f"{time.perf_counter() - started:.1f} s (training items merged before the stored events); "
          f"store marked as seeded by model {checkpoint.model_version}")
    return 0


def add_load_histories_parser(subparsers) -> None:
    p = subparsers.add_parser("load-histories", help="copy a checkpoint's training histories into Redis "
                              "(merged before stored events; idempotent)")
    p.add_argument("--checkpoint", help="checkpoint directory (default: $CLLM4REC_CHECKPOINT)")
    p.add_argument("--redis-url", help="redis://host:port/db (default: $CLLM4REC_REDIS_URL)")
    p.set_defaults(func=run_load_histories)


# --- quickstart ------------------------------------------------------------------------------------

def build_quickstart_checkpoint(directory: Path) -> Path:
    """Generated data and a small trained checkpoint under directory; both reused when present."""
    data, checkpoint = directory / "data", directory / "checkpoint"
    if not (data / "interactions.csv").exists():
        write_synthetic_dataset(data, reviews=False)
        print(f"quickstart: generated 400 users with tastes for 160 titled items in {data}")
    trained = checkpoint / ".quickstart-complete"
    if trained.exists():
        print(f"quickstart: reusing the trained checkpoint in {checkpoint} (delete it to train again)")
        return checkpoint
    resume = (checkpoint / STATE_DIR / "state.json").exists()  # an interrupted quickstart continues
    if checkpoint.exists() and not resume:
        shutil.rmtree(checkpoint)  # interrupted before its first epoch ended: nothing worth keeping
    print("quickstart: training on the CPU with the real SmolLM2-135M backbone cut to "
          f"{QUICKSTART_TRAINING['backbone_layers']} layers (a minute or two on 2 cores)")
    started = time.perf_counter()
    train(TrainConfig(data=str(data), out=str(checkpoint), resume=resume, **QUICKSTART_TRAINING))
    trained.touch()
    print(f"quickstart: trained in {time.perf_counter() - started:.0f} s; checkpoint in {checkpoint}")
    return checkpoint


def quickstart_banner(checkpoint: Path, url: str) -> str:
    """Where to send requests, with real ids of the generated data."""
    ckpt = read_checkpoint(checkpoint)
    user = ckpt.user_ids[0]
    history = ckpt.split.train[0].tolist()
    liked = ", ".join(ckpt.item_titles[i] for i in history[:4])
    new_items = [ckpt.item_ids[i] for i in history[:2]]

    def post(path: str, body: dict) -> str:
        return f"curl -s -X POST {url}{path} -H 'content-type: application/json' -d '{json.dumps(body)}'"

    return "\n".join([
        "",
        f"cllm4rec is serving {checkpoint} at {url} (API docs: {url}/docs). Try:",
        f"  # user {user} bought: {liked}, ...",
        "  " + post("/recommend", {"user_id": user, "k": 5}),
        f"  curl -s '{url}/recommend/{user}?k=5'",
        "  # a new event, reflected by the next recommendation:",
        "  " + post("/interactions", {"user_id": user, "item_ids": [ckpt.item_ids[-1]]}),
        "  # a visitor the model has never seen, with a history of its own:",
        "  " + post("/recommend", {"user_id": "visitor-1", "k": 5, "history": new_items}),
        f"  curl -s {url}/metrics | grep ^cllm4rec_",
        "Ctrl-C stops the server.",
        "",
    ])


def run_quickstart(args) -> int:
    directory = Path(args.dir)
    checkpoint = build_quickstart_checkpoint(directory)
    if args.no_serve:
        return 0
    # The embedded history store, whatever the environment says: the quickstart needs nothing else.
    settings = settings_from(checkpoint=checkpoint, host=args.host, port=args.port).model_copy(
        update={"redis_url": None})
    host = "localhost" if settings.host in ("127.0.0.1", "0.0.0.0", "::") else settings.host
    return serve(settings, quickstart_banner(checkpoint, f"http://{host}:{settings.port}"))


def add_quickstart_parser(subparsers) -> None:
    p = subparsers.add_parser("quickstart", help="generate data, train a small checkpoint with the real backbone "
                              "(minutes on a CPU; reused next time) and serve it")
    # Defaults written out: ArgumentDefaultsHelpFormatter would add "(default: None)" to --host and --port,
    # whose defaults come from the environment.
    p.add_argument("--dir", default="runs/quickstart", help="where the data and the checkpoint go (default: %(default)s)")
    p.add_argument("--host", help="interface to listen on (default: $CLLM4REC_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (default: $CLLM4REC_PORT or 8000)")
    p.add_argument("--no-serve", action="store_true", help="only build (or reuse) the data and the checkpoint, "
                   "then exit (images build the demo checkpoint this way)")
    p.set_defaults(func=run_quickstart)


# --- the command -----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cllm4rec", description="CLLM4Rec: LLM recommendations, trained offline "
                                     "and served online")
    subparsers = parser.add_subparsers(dest="command", required=True)
    model_cli.add_parsers(subparsers)
    add_serve_parser(subparsers)
    add_load_histories_parser(subparsers)
    add_quickstart_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        return model_cli.report_error(e)
    except KeyboardInterrupt:  # Ctrl-C before the server took over the signal (while loading)
        return 130


if __name__ == "__main__":
    sys.exit(main())
