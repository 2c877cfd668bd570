"""Training throughput of the pipeline's fine-tune step against a plain transformers Trainer.

    python benchmarks/bench_finetune.py                           # stories260K, CPU
    python benchmarks/bench_finetune.py --model llama-3m          # 3.4M params, CPU
    python benchmarks/bench_finetune.py --model llama-125m --device cuda --precision bf16 \\
        --examples 2000 --batch-size 32                           # ~125M Llama on a GPU (+ MFU)
    python benchmarks/bench_finetune.py --model models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --prompt-format chat --max-length 256 --examples 16 --batch-size 4 \
        --learning-rate 3e-5 --precision bf16 --threads 1    # a real model (a folder or a GGUF)

Same model, same GSM8K examples (prompt template, max_length, completion-only labels), same
optimizer settings, seed, epochs and batch size, in one process, alternating repeats:
  - step: steps.training.finetune.finetune as the flow calls it (length-grouped batches, checkpoints
    every --checkpoint-steps, per-step MLflow logging into a throwaway SQLite store);
  - plain: Trainer + DataCollatorForSeq2Seq (pads labels with -100), random batches;
  - plain+grouped: the same with Trainer's own train_sampling_strategy="group_by_length".
tokens/s counts real (non-padding) tokens over the wall time of trainer.train(), best of
--repeats; padding is the share of computed positions that were padding.
`--model llama-3m|llama-125m` builds a Llama from a config (random init, no hub;
stories260K's tokenizer); any other --model is what model.name takes (a folder, a hub id, a
.gguf file converted once into .sift/gguf/: benchmarks/model_arguments.py). On CUDA the
script also reports model FLOPs utilisation (6N + 12·L·d·T FLOPs per token, PaLM appendix B)
against --peak-tflops (H100 SXM dense bf16: 989). --threads sets torch's CPU threads.

    python benchmarks/bench_finetune.py --compare-packing --examples 400 --epochs 2

--compare-packing instead trains the same model on the same examples two ways, one after the
other, with the same optimizer, schedule, seed and epochs, and prints tokens/s, the ratio, held-out
loss and the training losses at matching steps (PNG: docs/results/packing_vs_sampler_<model>.png):
  - sampler: the step (length-grouped EpochSampler, padded batches of --batch-size examples);
  - packing: TRL's SFTTrainer with packing=True, packing_strategy="bfd" (rows of at most
    --packed-length tokens, each example whole; padding-free, so no attention_mask: the model
    masks each example off from the others by its position_ids). The dataset is our encoded
    examples with their labels (-100 on the prompt), which SFTTrainer uses as they are, so the
    loss stays on response tokens only (the collator also masks each row's first token). Rows
    per batch are chosen so that both runs take the same number of optimizer steps, and so see
    about the same tokens per step. Note SFTTrainer also patches in its fused LM head (the
    output projection on loss-bearing positions only).
Padding-free collation flattens the whole batch into one sequence; only a varlen kernel
(flash-attention 2/3, not in the lock) computes attention per example. sdpa and eager, on CPU
or GPU, compute the whole row's T² scores under a block-diagonal mask (transformers builds it
from position_ids), so a batch of B examples costs about B× the attention of its padded form.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
STORIES = REPO / "assets" / "models" / "stories260K"
# Random-init Llama configs (hidden, layers, heads): ~125M parameters for GPUs, ~3M for CPUs
# (~30M: a middle width for bench_precision.py)
# (where stories260K's 260k parameters make per-step overhead, not tokens, the cost).
LLAMA_SIZES = {"llama-125m": (768, 13, 12), "llama-30m": (512, 8, 8), "llama-3m": (256, 4, 8)}


def build_model(name: str, work_dir: Path) -> Path:
    """A local model folder: stories260K as bundled, a random-init Llama (LLAMA_SIZES), or the
    folder model.name=`name` loads (a GGUF: its converted folder)."""
    if name == "stories260K":
        return STORIES
    if name not in LLAMA_SIZES:
        from model_arguments import benchmark_model

        return Path(benchmark_model(name).name)
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    hidden, layers, heads = LLAMA_SIZES[name]
    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    folder = work_dir / name
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def shown(model_dir: Path, args):
    """The model folder with the examples shown as --max-length and --prompt-format say."""
    from steps.modeling import ModelConfig

    return ModelConfig(
        name=str(model_dir), max_length=args.max_length, prompt_format=args.prompt_format
    )


def gsm8k_table(examples: int, path: Path) -> list[str]:
    with (REPO / "assets" / "data" / "gsm8k" / "train.jsonl").open() as handle:
        rows = [json.loads(next(handle)) for _ in range(examples)]
    frame = pd.DataFrame(
        {
            "id": [f"gsm8k-{i}" for i in range(len(rows))],
            "prompt": [r["question"] for r in rows],
            "response": [r["answer"] for r in rows],
        }
    )
    frame.to_parquet(path)
    return list(frame.id)


def run_step(args, model_dir: Path, table: Path, ids: list[str], out_dir: Path, run_id: str):
    from steps.training.finetune import FinetuneConfig, finetune

    config = FinetuneConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        checkpoint_steps=args.checkpoint_steps,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    model = shown(model_dir, args)
    ref = finetune(str(table), ids, model, config, out_dir, args.device, args.precision, run_id)
    return ref.tokens / ref.seconds, ref.padding_fraction, ref.seconds


def run_plain(args, model_dir: Path, table: Path, ids: list[str], out_dir: Path, grouped: bool):
    """The textbook loop: Trainer, DataCollatorForSeq2Seq, the same tokens and settings."""
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    from steps.modeling import encode_examples, load_tokenizer

    model_config = shown(model_dir, args)
    tokenizer = load_tokenizer(model_config)
    frame = pd.read_parquet(table).set_index("id").loc[ids]
    encoded = encode_examples(tokenizer, list(frame.prompt), list(frame.response), model_config)
    dataset = [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded]
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    counts = {"real": 0, "all": 0}

    def counting_collator(features):
        batch = collate(features)
        counts["real"] += int(batch["attention_mask"].sum())
        counts["all"] += batch["attention_mask"].numel()
        return batch

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(args.device)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(out_dir),
            num_train_epochs=args.epochs,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            lr_scheduler_type="cosine",
            max_grad_norm=1.0,
            activation_checkpointing=args.gradient_checkpointing,
            train_sampling_strategy="group_by_length" if grouped else "random",
            save_strategy="no",
            report_to=[],
            seed=0,
            bf16=args.precision == "bf16",
            fp16=args.precision == "fp16",
            use_cpu=args.device == "cpu",
            remove_unused_columns=False,
        ),
        train_dataset=dataset,
        data_collator=counting_collator,
        processing_class=tokenizer,
    )
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    return counts["real"] / seconds, 1 - counts["real"] / counts["all"], seconds


def flops_per_token(model_dir: Path, seq_len: float) -> float:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    d, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    n = layers * (4 * d * d + 3 * d * config.intermediate_size) + vocab * d  # + output head
    return 6 * n + 12 * layers * d * seq_len


@dataclass(frozen=True)
class Trained:
    """One run of --compare-packing: throughput, the loss curve and the held-out loss."""

    name: str
    tokens_per_second: float
    seconds: float
    steps: int
    tokens: int
    curve: list[tuple[int, int, float]]  # (step, non-padding tokens seen, training loss)
    heldout_loss: float


def encoded_split(model_dir: Path, args, split: str, rows: int):
    from steps.modeling import encode_examples, load_tokenizer

    config = shown(model_dir, args)
    with (REPO / "assets" / "data" / "gsm8k" / f"{split}.jsonl").open() as handle:
        records = [json.loads(next(handle)) for _ in range(rows)]
    questions, answers = [r["question"] for r in records], [r["answer"] for r in records]
    return encode_examples(load_tokenizer(config), questions, answers, config)


def heldout_loss(model, examples, pad_id: int, device: str) -> float:
    """Mean loss per response token over `examples` (GSM8K test rows), batches of 16."""
    from steps.modeling import pad_batch

    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(examples), 16):
            batch = {
                k: v.to(device) for k, v in pad_batch(examples[start : start + 16], pad_id).items()
            }
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            targets = batch["labels"][:, 1:]
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100, reduction="sum"
            )
            total, count = total + float(losses), count + int((targets != -100).sum())
    return total / count


def train_sampler(args, model_dir: Path, table: Path, ids: list[str], out_dir: Path, heldout):
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM

    from steps.training.finetune import FinetuneConfig, finetune

    client = MlflowClient()
    experiment = client.get_experiment_by_name("bench-finetune")
    assert experiment is not None
    run_id = client.create_run(experiment.experiment_id).info.run_id
    config = FinetuneConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        checkpoint_steps=0,
        logging_steps=1,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    model = shown(model_dir, args)
    ref = finetune(str(table), ids, model, config, out_dir, args.device, args.precision, run_id)
    losses = client.get_metric_history(run_id, "train/loss")
    seen = {
        m.step: int(m.value)
        for m in client.get_metric_history(run_id, "train/num_input_tokens_seen")
    }
    curve = [(m.step, seen.get(m.step, 0), m.value) for m in sorted(losses, key=lambda m: m.step)]
    tuned = AutoModelForCausalLM.from_pretrained(ref.model_dir).to(args.device)
    return Trained(
        "sampler (the step)",
        ref.tokens / ref.seconds,
        ref.seconds,
        ref.steps,
        ref.tokens,
        curve,
        heldout_loss(tuned, heldout[0], heldout[1], args.device),
    )


def packed_rows(examples, packed_length: int) -> int:
    """How many rows TRL's best-fit-decreasing packing makes of the examples."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    data = Dataset.from_dict({"input_ids": [e.input_ids for e in examples]})
    return len(pack_dataset(data, packed_length, "bfd"))


def train_packed(args, model_dir: Path, examples, out_dir: Path, rows_per_batch: int, heldout):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from steps.modeling import load_tokenizer

    tokenizer = load_tokenizer(shown(model_dir, args))
    if tokenizer.unk_token is not None:
        # Padding-free rows hold no padding; Trainer counts non-padding tokens as input_ids !=
        # pad_token_id, which with our pad (EOS) would skip every example's last token.
        tokenizer.pad_token = tokenizer.unk_token
    data = {"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(args.device)
    config = SFTConfig(
        output_dir=str(out_dir),
        num_train_epochs=args.epochs,
        per_device_train_batch_size=rows_per_batch,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        max_grad_norm=1.0,
        # SFTConfig's own defaults differ from TrainingArguments': checkpointing and bf16 on
        gradient_checkpointing=args.gradient_checkpointing,
        bf16=args.precision == "bf16",
        fp16=args.precision == "fp16",
        logging_steps=1,
        logging_nan_inf_filter=False,
        save_strategy="no",
        report_to=[],
        seed=0,
        data_seed=0,
        use_cpu=args.device == "cpu",
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
        packing=True,
        packing_strategy="bfd",
        max_length=args.packed_length,
    )
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=Dataset.from_dict(data), processing_class=tokenizer
    )
    started = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - started
    curve = [
        (int(entry["step"]), int(entry.get("num_input_tokens_seen", 0)), float(entry["loss"]))
        for entry in trainer.state.log_history
        if "loss" in entry
    ]
    tokens = int(trainer.state.num_input_tokens_seen)
    return Trained(
        f"packing (TRL SFTTrainer, bfd, {rows_per_batch} rows of <= {args.packed_length})",
        tokens / seconds,
        seconds,
        int(result.global_step),
        tokens,
        curve,
        heldout_loss(trainer.model, heldout[0], heldout[1], args.device),
    )


def compare_packing(args, model_dir: Path, table: Path, ids: list[str], work_dir: Path) -> None:
    from steps.modeling import ModelConfig, load_tokenizer

    try:
        import trl  # noqa: F401
    except ImportError as error:
        raise SystemExit("--compare-packing needs TRL: pip install trl==1.16.0") from error

    examples = encoded_split(model_dir, args, "train", args.examples)
    pad_id = load_tokenizer(ModelConfig(name=str(model_dir))).pad_token_id
    heldout = (encoded_split(model_dir, args, "test", args.heldout), pad_id)
    rows = packed_rows(examples, args.packed_length)
    # as many optimizer steps per epoch as the sampler's ceil(examples / batch_size)
    rows_per_batch = max(1, round(rows / math.ceil(len(examples) / args.batch_size)))
    runs: dict[str, Trained] = {}
    for repeat in range(args.repeats):
        for trained in (
            train_sampler(args, model_dir, table, ids, work_dir / f"s{repeat}", heldout),
            train_packed(
                args, model_dir, examples, work_dir / f"p{repeat}", rows_per_batch, heldout
            ),
        ):
            best = runs.get(trained.name)
            if best is None or trained.tokens_per_second > best.tokens_per_second:
                runs[trained.name] = trained
    sampler, packed = runs.values()
    print(
        f"\n{args.model}, {len(examples)} GSM8K examples "
        f"({sum(len(e.input_ids) for e in examples):,} tokens, "
        f"{rows} packed rows), {args.epochs} epoch(s), {args.device} {args.precision}, "
        f"best of {args.repeats}; held-out loss on {args.heldout} GSM8K test examples\n"
    )
    print("| batching | steps | tokens | train seconds | tokens/s | vs sampler | held-out loss |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for trained in (sampler, packed):
        print(
            f"| {trained.name} | {trained.steps} | {trained.tokens:,} | {trained.seconds:.1f} | "
            f"{trained.tokens_per_second:,.0f} | "
            f"{trained.tokens_per_second / sampler.tokens_per_second:.2f}x | "
            f"{trained.heldout_loss:.4f} |"
        )
    steps = min(len(sampler.curve), len(packed.curve))
    every = max(1, steps // 10)
    print("\n| step | sampler: tokens seen | loss | packing: tokens seen | loss |")
    print("|---:|---:|---:|---:|---:|")
    for i in [*range(0, steps - 1, every), steps - 1]:
        (step, seen_s, loss_s), (_, seen_p, loss_p) = sampler.curve[i], packed.curve[i]
        print(f"| {step} | {seen_s:,} | {loss_s:.4f} | {seen_p:,} | {loss_p:.4f} |")
    gap = sum(abs(a[2] - b[2]) for a, b in zip(sampler.curve, packed.curve, strict=False)) / steps
    print(f"\nmean |loss difference| at matching steps: {gap:.4f}")
    plot_curves(
        sampler, packed, REPO / "docs" / "results" / f"packing_vs_sampler_{args.model}.png", args
    )


def plot_curves(sampler: Trained, packed: Trained, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for trained in (sampler, packed):
        label = (
            f"{trained.name}: {trained.tokens_per_second:,.0f} tok/s, "
            f"held-out {trained.heldout_loss:.3f}"
        )
        axis.plot([c[1] for c in trained.curve], [c[2] for c in trained.curve], label=label)
    axis.set_xlabel("non-padding tokens seen")
    axis.set_ylabel("training loss (response tokens)")
    axis.set_title(
        f"{args.model}, {args.examples} GSM8K examples, {args.epochs} epoch(s), {args.device}"
    )
    axis.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    print(f"loss curves: {path.relative_to(REPO)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default="stories260K",
        help=f"stories260K, {', '.join(LLAMA_SIZES)}, or a model.name (folder, hub id, .gguf)",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--prompt-format", choices=["template", "chat"], default="template")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--checkpoint-steps", type=int, default=50)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--compare-packing", action="store_true", help="sampler vs TRL packing")
    parser.add_argument("--packed-length", type=int, default=512, help="packing: row length")
    parser.add_argument("--heldout", type=int, default=100, help="packing: test examples")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    work_dir = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work_dir / 'mlflow.db'}")
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("bench-finetune")).info.run_id
    model_dir = build_model(args.model, work_dir)
    table = work_dir / "train.parquet"
    ids = gsm8k_table(args.examples, table)
    if args.compare_packing:
        compare_packing(args, model_dir, table, ids, work_dir)
        return
    variants = {
        "step": lambda i: run_step(args, model_dir, table, ids, work_dir / f"step{i}", run_id),
        "plain": lambda i: run_plain(args, model_dir, table, ids, work_dir / f"p{i}", False),
        "plain+grouped": lambda i: run_plain(args, model_dir, table, ids, work_dir / f"g{i}", True),
    }
    best: dict[str, tuple[float, float, float]] = {}
    for repeat in range(args.repeats):
        for name, run in variants.items():
            measured = run(repeat)
            if name not in best or measured[0] > best[name][0]:
                best[name] = measured
    print(
        f"\n{args.model}, {args.examples} GSM8K examples, {args.epochs} epoch(s), batch "
        f"{args.batch_size}, {args.device} {args.precision}, best of {args.repeats}\n"
    )
    print("| loop | tokens/s | train seconds | padding | vs plain | vs plain+grouped |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (rate, padding, seconds) in best.items():
        print(
            f"| {name} | {rate:,.0f} | {seconds:.1f} | {padding:.1%} | "
            f"{rate / best['plain'][0]:.2f}× | {rate / best['plain+grouped'][0]:.2f}× |"
        )
    if args.device == "cuda":
        from steps.modeling import encode_examples, load_tokenizer

        config = shown(model_dir, args)
        frame = pd.read_parquet(table)
        lengths = [
            len(e.input_ids)
            for e in encode_examples(
                load_tokenizer(config), list(frame.prompt), list(frame.response), config
            )
        ]
        per_token = flops_per_token(model_dir, sum(lengths) / len(lengths))
        mfu = best["step"][0] * per_token / (args.peak_tflops * 1e12)
        print(
            f"\nstep MFU: {mfu:.1%} ({per_token / 1e6:.0f} MFLOPs/token, "
            f"peak {args.peak_tflops:.0f} TFLOP/s)"
        )


if __name__ == "__main__":
    main()
