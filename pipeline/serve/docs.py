"""docs/serve.md's generated section, from the tables `dsv4 serve` runs on."""

from __future__ import annotations

from pathlib import Path

from pipeline.serve.backends import MOE_BACKENDS
from pipeline.serve.checks import CHECKPOINT_CHECKS, CONFIG_CHECKS
from pipeline.serve.flags import FLAGS, render
from pipeline.serve.refusals import REFUSALS
from pipeline.serve.settings import DEFAULT_MOE_BACKEND, NODE_GPUS, ServeSettings
from pipeline.serve.spellings import SPELLINGS


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def tables_markdown() -> str:
    """The tables `dsv4 serve` runs on, as markdown; docs/serve.md holds them between its generated markers
    (tests/serve/test_serve.py fails when they differ)."""
    example = ServeSettings(ckpt=Path("/data/v4-nvfp4-vllm"), tensor_parallel_size=NODE_GPUS, mtp_tokens=1)
    lines = [
        "### Flags",
        "",
        "| flag | value (8 GPUs, `--mtp 1`) | dsv4 serve option | why | vLLM 0.32 source |",
        "|---|---|---|---|---|",
    ]
    for f in FLAGS:
        value = f.value(example)
        shown = "(only when given)" if value is None else " ".join(render(value))
        lines.append(
            f"| `{f.option}` | `{_cell(shown)}` | {f'`{f.ours}`' if f.ours else 'fixed'} | {_cell(f.why)} "
            f"| `{_cell(f.source)}` |"
        )
    lines += [
        "",
        "### MoE backends",
        "",
        "Every value of `--moe-backend` in vLLM 0.32 and 0.33, in vLLM's order; *vLLM*: the versions that "
        "have it. *NVFP4 kernel*: what `map_nvfp4_backend` maps it to; *clamp*: in "
        "`NVFP4_BACKENDS_WITH_CLAMP` (V4 sets `swiglu_limit`).",
        "",
        "| backend | vLLM | NVFP4 kernel | clamp | dsv4 serve | what it is / why refused |",
        "|---|---|---|---|---|---|",
    ]
    for b in MOE_BACKENDS:
        verdict = "**refused**" if b.refused else ("default" if b.name == DEFAULT_MOE_BACKEND else "allowed")
        why = b.note if not b.refused else f"{b.note}. Refused: {b.refused}"
        lines.append(
            f"| `{b.name}` | {', '.join(b.versions)} | {b.nvfp4 or '-'} | {'yes' if b.clamp else 'no'} "
            f"| {verdict} | {_cell(why)} |"
        )
    lines += ["", "### Other refused vLLM flags", "", "| flag | values | why | seen |", "|---|---|---|---|"]
    for r in REFUSALS:
        spellings = ", ".join(f"`{s}`" for s in SPELLINGS[r.setting])
        values = ", ".join(f"`{v}`" for v in sorted(r.values)) if r.values else "any"
        lines.append(f"| {spellings} | {values} | {_cell(r.why)} | {_cell(r.seen)} |")
    lines += [
        "",
        "A pass-through flag for a setting in the flags table is refused too, naming the dsv4 serve option "
        "to use (`-tp 4` -> `--tensor-parallel-size`), as is `--model`.",
        "",
        "### Checkpoint checks",
        "",
        "| check | what |",
        "|---|---|",
    ]
    lines += [f"| {c.name} | {_cell(c.why)} |" for c in (*CONFIG_CHECKS, *CHECKPOINT_CHECKS)]
    return "\n".join(lines) + "\n"
