"""Language-model clients: training tokens per second of pfedlora's step against the obvious loop, on one
core (or a GPU), with the share of the same-precision matmul rate each reaches (prints figures, asserts
nothing).

The obvious loop is what a user writes with transformers and PEFT: PEFT's LoRA (r = ``--rank``) on q_proj
and v_proj of every layer of SmolLM2-135M (all 30), SGD on the loss transformers computes from ``labels``
(padding -100), under bf16 autocast or in fp32. pfedlora's step is a client's private-adapter phase
(:class:`~pfedlora.models.causal_lm.LanguageModelClient`: the frozen model once per process, its adapters
put on through forward hooks) on the same batches, with the variants below. Every variant starts from
adapters whose B is zero, so their first losses must agree (printed); tokens are the real ones (the
attention mask's), batches ``--batch`` x ``--length`` tokens with lengths drawn from 40% to 100% of it.
The variants run in turns, ``--repeats`` times; the best time of each counts. FLOPs per step come from
PyTorch's counter; the matmul rates are measured here (1024 x 1024 x 1024 in fp32 and bf16).

- ``obvious``: the loop above.
- ``pfedlora, fp32 base``: our step with the frozen weights in fp32 (autocast casts them for every matmul)
  and the language-model head over every position, padding included (the obvious loss).
- ``+ head on real tokens``: the head and the loss over the positions whose next token is real.
- ``+ bf16 base``: the frozen weights kept in bfloat16 (bf16 only), so that no matmul casts them.
- ``+ packed``: the real tokens alone run through the decoder, packed into one row (each sample's positions
  from 0, no token attending across samples): no work on padding. pfedlora's default.

    python bench/lm.py [--steps 4] [--batch 8] [--length 64] [--rank 8] [--repeats 2] [--device cpu]
    python bench/lm.py --smoke      # a tiny random Llama: does it run?
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

from pfedlora.config import load_config
from pfedlora.models.causal_lm import build_language_model, frozen_causal_lm
from pfedlora.models.peft_lora import lora_config
from pfedlora.models.registry import ModelSettings
from pfedlora.seeding import torch_generator
from pfedlora.tasks import LANGUAGE_MODELING
from pfedlora.testing import tiny_llama

console = Console()
Step = Callable[[torch.Tensor], float]


def batches(vocabulary: int, batch: int, length: int, count: int, device: str) -> list[torch.Tensor]:
    """``count`` text batches (B, 2, L) of random ids, each sample 40-100% real tokens, the rest padding."""
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        ids = torch.randint(3, vocabulary, (batch, length), generator=generator)
        real = torch.randint(int(0.4 * length), length + 1, (batch,), generator=generator)
        mask = (torch.arange(length)[None, :] < real[:, None]).long()
        out.append(torch.stack([ids * mask, mask], dim=1).to(device))
    return out


def matmul_rate(dtype: torch.dtype, device: str) -> float:
    """FLOP/s of 1024^3 matmuls in ``dtype``."""
    a = torch.randn(1024, 1024, device=device, dtype=dtype)
    b = torch.randn(1024, 1024, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(5):
        _sync(device)
        started = time.perf_counter()
        for _ in range(10):
            a @ b
        _sync(device)
        best = min(best, time.perf_counter() - started)
    return 10 * 2 * 1024**3 / best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def obvious_step(checkpoint: str, rank: int, bf16: bool, device: str, lr: float) -> Step:
    """The transformers + PEFT loop: LoRA on q/v of every layer, the loss from ``labels``."""
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="eager")
    model = peft.get_peft_model(model.to(device), lora_config(_targets(model), rank, 2.0 * rank))
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=lr, momentum=0.9)

    def step(x: torch.Tensor) -> float:
        ids, mask = x[:, 0], x[:, 1]
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        optimizer.step()
        return float(loss)

    return step


def _targets(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))]


def pfedlora_step(
    checkpoint: str,
    rank: int,
    bf16: bool,
    device: str,
    lr: float,
    *,
    real_tokens: bool,
    bf16_base: bool,
    packed: bool = False,
) -> Step:
    """A client's private-adapter phase, one step: the frozen base in bf16 or fp32, the head over the real
    next tokens or every position, the decoder over the padded batch or its real tokens packed."""
    settings = ModelSettings.of(load_config(None, [f"model.checkpoint={checkpoint}"]).model)
    client = build_language_model(
        f"hf-r{rank}",
        settings,
        torch_generator(0, "bench-lm"),
        base_dtype=torch.bfloat16 if bf16_base else torch.float32,
    ).to(device)
    if not packed:
        client.packed_tokens = 0
    parameters = client.local_parameters()
    optimizer = torch.optim.SGD(parameters, lr=lr, momentum=0.9)
    dummy = torch.zeros(0)

    def step(x: torch.Tensor) -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            if real_tokens:
                loss = LANGUAGE_MODELING.batch_loss(client, x, dummy)
            else:
                loss = LANGUAGE_MODELING.loss(client(x), x, dummy)
        loss.backward()
        optimizer.step()
        return float(loss)

    return step


def flops_of(step: Step, x: torch.Tensor) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        step(x)
    return float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant and turn")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="turns of every variant")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smoke", action="store_true", help="a tiny random Llama: does it run?")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.device == "cpu":
        torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        if args.smoke:
            args.steps, args.batch, args.length, args.rank, args.repeats = 1, 2, 8, 2, 1
            checkpoint = str(tiny_llama(Path(folder) / "tiny", layers=2, hidden=16, causal_lm=True))
        else:
            from pfedlora.models.transformer import smollm2_checkpoint

            checkpoint = str(smollm2_checkpoint())
        vocabulary = int(frozen_causal_lm(checkpoint).config.vocab_size)
        data = batches(vocabulary, args.batch, args.length, args.steps + 1, args.device)
        tokens = sum(int(x[:, 1].sum()) for x in data[1:])
        threads = torch.get_num_threads() if args.device == "cpu" else 0
        console.print(
            f"torch {torch.__version__}, {args.device}"
            + (f", {threads} thread" if threads else "")
            + f", batch {args.batch} x {args.length} tokens ({tokens / args.steps:.0f} real a step), LoRA r="
            f"{args.rank} on q_proj/v_proj of every layer, SGD"
        )
        rates = {
            precision: matmul_rate(dtype, args.device)
            for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
        }
        for precision in ("fp32", "bf16"):
            bf16 = precision == "bf16"
            variants: dict[str, Step] = {
                "obvious (transformers + PEFT)": obvious_step(checkpoint, args.rank, bf16, args.device, 1e-3),
                "pfedlora, fp32 base": pfedlora_step(
                    checkpoint, args.rank, bf16, args.device, 1e-3, real_tokens=False, bf16_base=False
                ),
                "+ head on real tokens": pfedlora_step(
                    checkpoint, args.rank, bf16, args.device, 1e-3, real_tokens=True, bf16_base=False
                ),
            }
            if bf16:
                variants["+ bf16 base"] = pfedlora_step(
                    checkpoint, args.rank, bf16, args.device, 1e-3, real_tokens=True, bf16_base=True
                )
            variants["+ packed"] = pfedlora_step(
                checkpoint, args.rank, bf16, args.device, 1e-3, real_tokens=True, bf16_base=bf16, packed=True
            )
            first = {name: step(data[0]) for name, step in variants.items()}  # warm-up, and B = 0 everywhere
            flops = {name: flops_of(step, data[0]) for name, step in variants.items()}
            best = dict.fromkeys(variants, float("inf"))
            for _ in range(args.repeats):
                for name, step in variants.items():  # in turns: drift on a shared machine hits all alike
                    _sync(args.device)
                    started = time.perf_counter()
                    for x in data[1:]:
                        step(x)
                    _sync(args.device)
                    best[name] = min(best[name], time.perf_counter() - started)
            obvious = tokens / best["obvious (transformers + PEFT)"]
            rate = rates[precision] / 1e9
            table = Table(title=f"training tokens/s, {precision} (matmul rate here {rate:.0f} GFLOP/s)")
            for column in (
                "variant",
                "first loss",
                "tokens/s",
                "× obvious",
                "GFLOP/step",
                "% of matmul rate",
            ):
                table.add_column(column, justify="right")
            for name in variants:
                speed = tokens / best[name]
                achieved = flops[name] * args.steps / best[name]
                table.add_row(
                    name,
                    f"{first[name]:.4f}",
                    f"{speed:.1f}",
                    f"{speed / obvious:.2f}",
                    f"{flops[name] / 1e9:.1f}",
                    f"{100 * achieved / rates[precision]:.1f}",
                )
            console.print(table)
            del variants


if __name__ == "__main__":
    main()
