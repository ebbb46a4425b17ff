"""`dsv4 serve CKPT`: serve a converted checkpoint with vLLM, or print / write the command
(pipeline/serve/ holds the tables and the vLLM source each flag rests on)."""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.cli.options import add_target_vllm, command_parser
from pipeline.errors import DsV4Error

if TYPE_CHECKING:
    from pipeline.serve import ServeSettings

SUMMARY = "serve a converted checkpoint with vLLM (health check + smoke request), or print/compose it"

DESCRIPTION = """\
Serve a checkpoint written by `dsv4 convert` (quant_method fp8 + moe_quant_algo NVFP4: FP8 attention,
NVFP4 routed experts) with vLLM, after refusing what is known not to work.

Modes:
  (default)        start `vllm serve` here, wait for GET /health, send one greedy /v1/completions
                   request, print the completion and tokens/s, stop the server (--keep-running: leave it)
  --print          print the command and exit
  --compose FILE   write a docker compose file running the official vllm/vllm-openai image on it

Flags passed to vLLM, and why:
{flags}

Checked before anything starts (each failure says what to do):
{checks}

MoE backends refused for NVFP4 experts (--moe-backend, or passed through):
{refused}

Other refused vLLM flags:
{refusals}

Further vLLM flags go last, after --vllm-args (e.g. `--vllm-args --gpu-memory-utilization 0.92`); they
are checked against the same tables, and a flag for a setting dsv4 serve makes itself is refused,
naming the dsv4 serve option to use instead.
"""


def _rows(rows: list[tuple[str, str]], width: int) -> str:
    """Two-column rows, the text wrapped under itself."""
    out = []
    for name, text in rows:
        lead = f"  {name:<{width}} "
        out.append(textwrap.fill(text, 108, initial_indent=lead, subsequent_indent=" " * len(lead)))
    return "\n".join(out)


def _item(text: str) -> str:
    """One entry of a list, its continuation lines indented under it."""
    return textwrap.fill(text, 108, initial_indent="  ", subsequent_indent="      ")


def _description() -> str:
    from pipeline import serve as S

    flags = _rows([(f.option, f.why) for f in S.FLAGS], 22)
    checks = _rows([(c.name, c.why) for c in (*S.CONFIG_CHECKS, *S.CHECKPOINT_CHECKS)], 16)
    by_reason: dict[str, list[str]] = {}
    for b in S.MOE_BACKENDS:
        if b.refused:
            by_reason.setdefault(b.refused, []).append(b.name)
    refused = "\n".join(_item(f"{', '.join(names)}: {why}") for why, names in by_reason.items())
    refusals = "\n".join(
        _item(
            f"--{r.setting.replace('_', '-')} {', '.join(sorted(r.values)) if r.values else '(any value)'}: "
            f"{r.why} ({r.seen})"
        )
        for r in S.REFUSALS
    )
    return DESCRIPTION.format(flags=flags, checks=checks, refused=refused, refusals=refusals)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = command_parser(subparsers, __name__, SUMMARY, _description())
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pipeline import serve as S

    p.add_argument("ckpt", help="checkpoint directory written by `dsv4 convert`")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--print", dest="print_cmd", action="store_true", help="print the command and exit")
    mode.add_argument("--compose", metavar="FILE", help="write a docker compose file and exit")
    p.add_argument(
        "--tensor-parallel-size",
        "--tp",
        type=int,
        metavar="N",
        help=f"GPUs to split the model over; when not given, the GPUs visible here, else {S.NODE_GPUS}",
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        default=S.DEFAULT_MAX_MODEL_LEN,
        metavar="TOKENS",
        help="longest sequence",
    )
    p.add_argument(
        "--served-model-name",
        metavar="NAME",
        help="model name in the API; when not given, the checkpoint's directory name",
    )
    p.add_argument(
        "--host",
        metavar="HOST",
        help=f"address to bind; when not given, {S.LOCAL_HOST} ({S.CONTAINER_HOST} inside the compose "
        "container)",
    )
    p.add_argument("--port", type=int, default=S.DEFAULT_PORT, metavar="PORT", help="port")
    p.add_argument(
        "--moe-backend",
        default=S.DEFAULT_MOE_BACKEND,
        metavar="BACKEND",
        help="vLLM MoE backend for the NVFP4 experts (allowed: "
        f"{', '.join(b.name for b in S.MOE_BACKENDS if b.allowed)})",
    )
    p.add_argument(
        "--mtp",
        type=int,
        default=0,
        metavar="N",
        help="MTP speculative decoding with N draft tokens, 0 for none (needs the checkpoint's MTP block)",
    )
    p.add_argument(
        "--tokenizer", metavar="DIR", help="directory with the tokenizer when the checkpoint has none"
    )
    add_target_vllm(p)
    p.add_argument(
        "--image",
        metavar="IMAGE",
        help="compose: the image; when not given, vllm/vllm-openai of --target-vllm",
    )
    p.add_argument("--shm-size", default=S.DEFAULT_SHM_SIZE, metavar="SIZE", help="compose: shared memory")
    p.add_argument(
        "--vllm-bin",
        default="vllm",
        metavar="PATH",
        help="run: the vllm executable (a name on PATH or a path)",
    )
    p.add_argument(
        "--health-timeout",
        type=float,
        default=S.DEFAULT_HEALTH_TIMEOUT,
        metavar="SECONDS",
        help="run: seconds to wait for /health",
    )
    p.add_argument(
        "--log-file",
        metavar="FILE",
        help="run: the server's log; when not given, a file in the temp directory",
    )
    p.add_argument("--prompt", default=S.SMOKE_PROMPT, metavar="TEXT", help="run: the smoke prompt")
    p.add_argument(
        "--max-tokens", type=int, default=S.SMOKE_MAX_TOKENS, metavar="N", help="run: tokens to generate"
    )
    p.add_argument(
        "--keep-running", action="store_true", help="run: leave the server running after the smoke test"
    )
    p.add_argument(
        "--vllm-args",
        dest="vllm_extra",
        nargs=argparse.REMAINDER,
        default=[],
        metavar="VLLM_FLAG",
        help="last: everything after it goes to `vllm serve` as it is (checked against the refusals)",
    )


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    from pipeline import serve as S

    if args.tensor_parallel_size is not None:
        tp, why = args.tensor_parallel_size, "--tensor-parallel-size"
    else:
        tp, why = S.default_tensor_parallel_size()
    if tp < 1:
        raise DsV4Error(f"--tensor-parallel-size {tp}: must be at least 1")
    if args.mtp < 0:
        raise DsV4Error(f"--mtp {args.mtp}: must be 0 (off) or more")
    extra = list(args.vllm_extra or [])
    return S.ServeSettings(
        ckpt=Path(args.ckpt),
        tensor_parallel_size=tp,
        max_model_len=args.max_model_len,
        served_model_name=args.served_model_name or "",
        host=args.host or S.LOCAL_HOST,
        port=args.port,
        moe_backend=args.moe_backend,
        mtp_tokens=args.mtp,
        tokenizer=None if args.tokenizer is None else Path(args.tokenizer),
        extra=tuple(extra),
        target_vllm=args.target_vllm,
        tp_reason=why,
    )


def run(args: argparse.Namespace) -> int:
    from pipeline import serve as S

    settings = settings_from_args(args)
    S.preflight(settings)
    if args.print_cmd:
        print(shlex.join(S.server_command(settings, args.vllm_bin)))
        return 0
    if args.compose:
        return _write_compose(settings, args)
    return _run_server(settings, args)


def _write_compose(settings: ServeSettings, args: argparse.Namespace) -> int:
    from pipeline import serve as S
    from pipeline.checkpoint.writer import write_bytes_atomic

    spec = S.compose_spec(settings, image=args.image, shm_size=args.shm_size)
    header = (
        f"written by `dsv4 serve {settings.ckpt} --compose {args.compose}`; start: docker compose -f "
        f"{args.compose} up -d\nthe checkpoint is mounted read-only; the health check polls /health"
    )
    path = Path(args.compose)
    write_bytes_atomic(path, S.to_yaml(spec, header).encode())
    service = spec["services"]["vllm"]
    print(f"wrote {path}: {service['image']}, {settings.tensor_parallel_size} GPU(s), port {settings.port}")
    print(f"  vllm serve {shlex.join(service['command'])}")
    return 0


def _run_server(settings: ServeSettings, args: argparse.Namespace, out=None) -> int:
    from pipeline import serve as S

    out = out or sys.stdout
    if shutil.which(args.vllm_bin) is None:
        raise DsV4Error(
            f"{args.vllm_bin}: not found (install vLLM, pass --vllm-bin PATH, or use --print / --compose)"
        )
    command = S.server_command(settings, args.vllm_bin)
    log_path = Path(args.log_file) if args.log_file else _default_log(settings)
    url = S.base_url(settings)
    print(f"starting: {shlex.join(command)}", file=out, flush=True)
    print(f"server log: {log_path}", file=out, flush=True)
    proc = S.start_server(command, log_path)
    try:
        waited = S.wait_for_health(url, proc, log_path, timeout=args.health_timeout, out=out)
        print(f"healthy after {waited:.0f} s: {url}", file=out, flush=True)
        result = S.smoke_request(url, settings.model_name, prompt=args.prompt, max_tokens=args.max_tokens)
        print(f"prompt: {args.prompt!r}", file=out)
        print(
            f"completion (greedy, {result.completion_tokens} tokens, finish_reason {result.finish_reason}): "
            f"{result.text!r}",
            file=out,
        )
        print(
            f"throughput: {result.completion_tokens} tokens in {result.seconds:.2f} s = "
            f"{result.tokens_per_second:.1f} tokens/s (one request, prefill of {result.prompt_tokens} "
            "prompt tokens included)",
            file=out,
            flush=True,
        )
        ok = result.completion_tokens > 0
        if not ok:
            print("smoke test FAILED: the server returned no tokens", file=out)
        return 0 if ok else 1
    finally:
        if args.keep_running and proc.poll() is None:
            print(
                f"left running: pid {proc.pid} at {url} (log {log_path}); stop it with: kill -TERM {proc.pid}",
                file=out,
                flush=True,
            )
        else:
            t0 = time.monotonic()
            code = S.stop_server(proc)
            print(
                f"server stopped (exit status {code}) in {time.monotonic() - t0:.1f} s", file=out, flush=True
            )


def _default_log(settings: ServeSettings) -> Path:
    return Path(tempfile.gettempdir()) / f"dsv4-serve-{settings.model_name}-{settings.port}.log"
