"""A stand-in for `vllm serve` that answers the two endpoints `dsv4 serve` uses, so that its run path
(start, wait for /health, one /v1/completions request, stop) is tested end to end without vLLM.

In-process: ``FakeVllm(...).start()`` serves from a thread. As a program: ``main(["serve", MODEL,
"--host", H, "--port", P, "--served-model-name", N, ...])`` (other flags are accepted and ignored),
controlled by environment variables:

  FAKE_VLLM_MODE           ok (default) | crash (print a load error, exit 1) | hang (never healthy)
  FAKE_VLLM_HEALTHY_AFTER  seconds before /health answers 200 (503 until then; default 0)
  FAKE_VLLM_RECORD         a file to write {"argv", "pid", "sigint", "requests", "stopped_by"} to,
                           rewritten on every event, so a test sees what the server was given, how it
                           stopped, and whether it started with SIGINT ignored ("sigint": "ignored") or at
                           its default ("default"), as `dsv4 serve` must start it

Canned answers follow vLLM's OpenAI-compatible shapes: /health is 200 with an empty body;
/v1/completions returns choices[0].text and usage; an unknown model name gets 404 like vLLM's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

CANNED_TEXT = " Paris. It is the largest city in France."
CANNED_TOKENS = 9
POLL = 0.02  # serve_forever's shutdown poll (the default 0.5 s would slow every test that stops it)


class FakeVllm:
    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        model: str = "fake",
        healthy_after: float = 0.0,
        healthy: bool = True,
        text: str = CANNED_TEXT,
        completion_tokens: int = CANNED_TOKENS,
        delay: float = 0.0,
        record: Path | None = None,
        argv: list[str] | None = None,
    ) -> None:
        self.model, self.text, self.completion_tokens, self.delay = model, text, completion_tokens, delay
        self.healthy, self.healthy_at = healthy, time.monotonic() + healthy_after
        self.requests: list[dict] = []
        self.record_path, self.argv, self.stopped_by = record, argv or [], None
        self.sigint = inherited_sigint()
        self.server = ThreadingHTTPServer((host, port), _handler(self))
        self.server.daemon_threads = True
        self.thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def is_healthy(self) -> bool:
        return self.healthy and time.monotonic() >= self.healthy_at

    def complete(self, body: dict) -> tuple[int, dict]:
        self.requests.append(body)
        self.record()
        if body.get("model") != self.model:
            return 404, {
                "error": {"message": f"The model `{body.get('model')}` does not exist.", "code": 404}
            }
        if self.delay:
            time.sleep(self.delay)
        prompt_tokens = len(str(body.get("prompt", "")).split())
        n = min(self.completion_tokens, int(body.get("max_tokens") or self.completion_tokens))
        return 200, {
            "id": "cmpl-fake",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [{"index": 0, "text": self.text, "logprobs": None, "finish_reason": "length"}],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": n,
                "total_tokens": prompt_tokens + n,
            },
        }

    def record(self) -> None:
        if self.record_path is None:
            return
        data = {
            "argv": self.argv,
            "pid": os.getpid(),
            "sigint": self.sigint,
            "requests": self.requests,
            "stopped_by": self.stopped_by,
        }
        tmp = self.record_path.with_name(self.record_path.name + ".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.record_path)

    def start(self) -> FakeVllm:
        self.thread = threading.Thread(target=self.server.serve_forever, args=(POLL,), daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def inherited_sigint() -> str:
    """How this process was started with SIGINT: CPython keeps an inherited SIG_IGN, and installs its
    KeyboardInterrupt handler over an inherited default (read before ``main`` installs its own)."""
    return "ignored" if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else "default"


def _handler(fake: FakeVllm) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, payload: dict | None) -> None:
            body = b"" if payload is None else json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._send(200 if fake.is_healthy() else 503, None)
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except json.JSONDecodeError:
                self._send(400, {"error": {"message": "body is not JSON"}})
                return
            if self.path != "/v1/completions":
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            self._send(*fake.complete(body))

        def log_message(self, format: str, *args) -> None:  # the server's log, like vLLM's access log
            print(f"fake-vllm: {self.address_string()} {format % args}", flush=True)

    return Handler


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="vllm")
    p.add_argument("subcommand", choices=["serve"])
    p.add_argument("model")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", nargs="+")
    args, _ = p.parse_known_args(argv)
    mode = os.environ.get("FAKE_VLLM_MODE", "ok")
    record = os.environ.get("FAKE_VLLM_RECORD")
    print(f"fake-vllm: serve {args.model} (mode {mode})", flush=True)
    if mode == "crash":
        print("fake-vllm: loading weights", flush=True)
        print("KeyError: 'layers.0.attn.norm.weight'", flush=True)
        return 1
    fake = FakeVllm(
        host=args.host,
        port=args.port,
        model=(args.served_model_name or [args.model])[0],
        healthy=mode != "hang",
        healthy_after=float(os.environ.get("FAKE_VLLM_HEALTHY_AFTER", "0")),
        record=Path(record) if record else None,
        argv=argv,
    )
    fake.record()

    def on_signal(signum, frame) -> None:
        fake.stopped_by = signal.Signals(signum).name
        fake.record()
        print(f"fake-vllm: {fake.stopped_by}, shutting down", flush=True)
        threading.Thread(target=fake.server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"fake-vllm: listening on {args.host}:{fake.port}", flush=True)
    fake.server.serve_forever(POLL)
    fake.server.server_close()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
