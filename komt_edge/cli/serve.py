"""`komt-edge serve MODEL`."""

from __future__ import annotations

import click

from .model_options import local_model


@click.command("serve")
@local_model
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; the default is reachable from this machine only (0.0.0.0: from others).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="TCP port (0: any free port, printed).")
@click.option("--api-key", default=None, envvar="KOMT_EDGE_API_KEY", show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on every /v1 route.")
@click.option("--parallel", type=click.IntRange(min=1), default=1, show_default=True,
              help="Copies of the model answering at the same time (each with its own --ctx); more requests wait.")
def serve_cmd(model: str, quants: str | None, org: str | None, revision: str | None, template: str | None,
              lora: str | None, n_ctx: int, n_threads: int | None, host: str, port: int, api_key: str | None,
              parallel: int) -> None:
    """Serve MODEL over an OpenAI-compatible API, with a Korean chat page at /.

    Routes: GET /v1/models, POST /v1/chat/completions and /v1/completions (with and without "stream"),
    GET /health, and the chat page at /. Chats are formatted by the chat template stored in the file.

    Example: komt-edge serve dist/komt-mistral-7b-v1-Q4_K_M.gguf --port 8000, then open http://127.0.0.1:8000/
    or point an OpenAI client at base_url="http://127.0.0.1:8000/v1"
    """
    from ..serve import serve

    serve(model, host=host, port=port, api_key=api_key, parallel=parallel, quant=quants, org=org,
          revision=revision, template=template, n_ctx=n_ctx, n_threads=n_threads, lora=lora, log=click.echo)
