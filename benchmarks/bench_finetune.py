"""Training throughput of the pipeline's fine-tune step against a plain transformers Trainer.

    python benchmarks/bench_finetune.py                           # stories260K, CPU
    python benchmarks/bench_finetune.py --model llama-3m          # 3.4M params, CPU
    python benchmarks/bench_finetune.py --model llama-125m --device cuda --precision bf16 \\
        --examples 2000 --batch-size 32                           # ~125M Llama on a GPU (+ MFU)

Same model, same GSM8K examples (prompt template, max_length, completion-only labels), same
optimizer settings, seed, epochs and batch size, in one process, alternating repeats:
  - step: steps.training.finetune.finetune as the flow calls it (length-grouped batches, checkpoints
    every --checkpoint-steps, per-step MLflow logging into a throwaway SQLite store);
  - plain: Trainer + DataCollatorForSeq2Seq (pads labels with -100), random batches;
  - plain+grouped: the same with Trainer's own train_sampling_strategy="group_by_length".
tokens/s counts real (non-padding) tokens over the wall time of trainer.train(), best of
--repeats; padding is the share of computed positions that were padding.
`--model llama-3m|llama-125m` builds a Llama from a config (random init, no hub;
stories260K's tokenizer). On CUDA the script also reports model FLOPs utilisation
(6N + 12·L·d·T FLOPs per token, PaLM appendix B) against --peak-tflops (H100 SXM dense
bf16: 989).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
STORIES = REPO / "assets" / "models" / "stories260K"
# Random-init Llama configs (hidden, layers, heads): ~125M parameters for GPUs, ~3M for CPUs
# (where stories260K's 260k parameters make per-step overhead, not tokens, the cost).
LLAMA_SIZES = {"llama-125m": (768, 13, 12), "llama-3m": (256, 4, 8)}


def build_model(name: str, work_dir: Path) -> Path:
    """A local model folder: stories260K as bundled, or a random-init Llama (LLAMA_SIZES)."""
    if name == "stories260K":
        return STORIES
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
    from steps.modeling import ModelConfig
    from steps.training.finetune import FinetuneConfig, finetune

    config = FinetuneConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        checkpoint_steps=args.checkpoint_steps,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    model = ModelConfig(name=str(model_dir), max_length=args.max_length)
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

    from steps.modeling import ModelConfig, encode_examples, load_tokenizer

    model_config = ModelConfig(name=str(model_dir), max_length=args.max_length)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["stories260K", *LLAMA_SIZES], default="stories260K")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--checkpoint-steps", type=int, default=50)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    args = parser.parse_args()

    work_dir = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work_dir / 'mlflow.db'}")
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("bench-finetune")).info.run_id
    model_dir = build_model(args.model, work_dir)
    table = work_dir / "train.parquet"
    ids = gsm8k_table(args.examples, table)
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
        from steps.modeling import ModelConfig, encode_examples, load_tokenizer

        config = ModelConfig(name=str(model_dir), max_length=args.max_length)
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
