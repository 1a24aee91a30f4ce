"""Preference tuning: DPO, ORPO and reward models on chosen/rejected pairs.

DPO's reference is the starting model, so its first loss is log 2 exactly (LoRA: adapters disabled; full
fine-tuning: a frozen sharded copy; QLoRA: the 4-bit base). The task's losses equal a hand computation from HF
model logits; 2 ranks equal 1 process; a killed DPO run resumes with identical losses (the reference does not
drift); a reward model learns a toy preference and exports as a plain HF classifier.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ASSETS, FAST, REPO, TINY, assert_losses_close, cli, eval_rows, free_port, losses
from fsdp_ft.observability.metrics import read_metrics
from launch_helpers import assert_stays_dead, kill9_job

LOG2 = math.log(2)
ONE_PROC = ["train.micro_batch_size=2", "train.grad_accum=2"]
TWO_RANKS = ["train.micro_batch_size=2", "train.grad_accum=1"]
STEPS = ["train.max_steps=6", "train.save_every=2", "optim.lr=1e-2", "train.eval_batch_size=8"]


# ---------------------------------------------------------------- data made from the shipped docstring text

def _paragraphs() -> list[str]:
    path = ASSETS / "data" / "tiny_text_train.jsonl"
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def _pairs(start: int, n: int, rejected: str = "other") -> list[dict]:
    """Prompt: a paragraph's first words; chosen: its true continuation; rejected: another paragraph's
    continuation ("other") or the true continuation in upper case ("upper", an easy toy preference)."""
    texts = _paragraphs()
    rows = []
    for i in range(start, start + n):
        words, other = texts[i].split(), texts[(i + 500) % len(texts)].split()
        k = min(6, len(words) // 2)
        chosen = " ".join(words[k:])
        rows.append({"prompt": " ".join(words[:k]), "chosen": chosen,
                     "rejected": chosen.upper() if rejected == "upper" else " ".join(other[k:])})
    return rows


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pref-data")
    return {"train": _write(d / "train.jsonl", _pairs(0, 48)), "eval": _write(d / "eval.jsonl", _pairs(1000, 16)),
            "easy_train": _write(d / "easy_train.jsonl", _pairs(0, 64, "upper")),
            "easy_eval": _write(d / "easy_eval.jsonl", _pairs(1000, 32, "upper"))}


def _args(data: dict[str, Path], task: str, *extra: str) -> list[str]:
    return [f"task={task}", f"data.train={data['train']}", f"data.eval={data['eval']}", *STEPS, *extra]


@pytest.fixture(scope="module")
def runs(session_tmp, pref_data):
    """Each run made once for the tests below: get(task, ranks, *overrides) -> run dir. One-process runs train
    in this process (`fsdp_ft.api.train`, what `fsdp-ft train` calls) to save the start-up of another interpreter."""
    from fsdp_ft.api import train
    from fsdp_ft.config import load_config

    cache: dict = {}

    def get(task: str, ranks: int, *extra: str) -> Path:
        key = (task, ranks, extra)
        if key not in cache:
            out = session_tmp / f"pref-{task}-{ranks}-{len(cache)}"
            overrides = [f"output_dir={out}", *FAST, *_args(pref_data, task, *extra)]
            if ranks == 1:
                train(load_config(TINY, [*overrides, *ONE_PROC]))
            else:
                cli("run", "--nproc-per-node", str(ranks), "--rdzv-endpoint", f"127.0.0.1:{free_port()}", str(TINY),
                    *overrides, *TWO_RANKS)
            cache[key] = out
        return cache[key]
    return get


# ---------------------------------------------------------------- runs through the CLI

@pytest.mark.distributed
@pytest.mark.parametrize("method", ["lora", "full"])
def test_dpo_starts_at_log2_and_two_ranks_equal_one_process(runs, method):
    """Step 1's loss is log 2 (reference == policy); later steps move away from it (the reference is not the
    policy once it trains); 2 ranks equal 1 process per step and at eval."""
    one, two = runs("dpo", 1, f"finetune.method={method}"), runs("dpo", 2, f"finetune.method={method}")
    got = losses(one)
    assert got[1] == pytest.approx(LOG2, rel=1e-7)
    assert max(abs(v - LOG2) for v in got.values()) > 1e-3
    assert_losses_close(losses(two), got, 1e-5)
    e1, e2 = eval_rows(one)[-1], eval_rows(two)[-1]
    assert (e1["accuracy"], e1["reward_accuracy"]) == (e2["accuracy"], e2["reward_accuracy"])
    for key in ("loss", "reward_margin", "chosen_reward", "rejected_reward"):
        # rewards are beta x differences of log-probs of about -300: float32 leaves ~1e-5 absolute
        assert e2[key] == pytest.approx(e1[key], rel=1e-5, abs=1e-5), key
    assert e1["reward_margin"] == pytest.approx(e1["chosen_reward"] - e1["rejected_reward"])
    setup = [r for r in read_metrics(one) if r.get("split") == "setup"][0]
    assert setup["reference"] == ("policy with adapters disabled" if method == "lora" else "frozen sharded copy")


@pytest.mark.slow  # the DPO 2-rank tests cover the same path; ORPO's loss is checked by hand below
@pytest.mark.distributed
def test_orpo_two_ranks_equal_one_process(runs):
    one, two = runs("orpo", 1), runs("orpo", 2)
    assert_losses_close(losses(two), losses(one), 1e-5)
    e1, e2 = eval_rows(one)[-1], eval_rows(two)[-1]
    assert e1["accuracy"] == e2["accuracy"]
    for key in ("loss", "nll", "log_odds_ratio", "reward_margin"):  # margin: lambda x a difference of ~-7s
        assert e2[key] == pytest.approx(e1[key], rel=1e-5, abs=1e-6), key


def test_qlora_dpo_starts_at_log2(runs):
    """The reference of a QLoRA run is its 4-bit base with adapters disabled: step 1 is log 2 exactly."""
    got = losses(runs("dpo", 1, "finetune.method=qlora"))
    assert sorted(got) == list(range(1, 7))
    assert got[1] == pytest.approx(LOG2, rel=1e-7)
    assert max(abs(v - LOG2) for v in got.values()) > 1e-3


@pytest.mark.parametrize("method", ["lora", "full"])
def test_dpo_resume_continues_exactly(runs, session_tmp, pref_data, method):
    """Resumed from the step-4 checkpoint, steps 5 and 6 equal the uninterrupted run bit for bit: the reference
    (LoRA: the base with adapters off; full: the frozen copy) comes back from model.path, not the checkpoint."""
    from fsdp_ft.api import train
    from fsdp_ft.config import load_config

    want = losses(runs("dpo", 1, f"finetune.method={method}"))
    out = session_tmp / f"pref-dpo-resumed-{method}"
    checkpoint = runs("dpo", 1, f"finetune.method={method}") / "checkpoints" / "step-4"
    train(load_config(TINY, [f"output_dir={out}", *FAST, *ONE_PROC, f"resume={checkpoint}",
                             *_args(pref_data, "dpo", f"finetune.method={method}")]))
    got = losses(out)
    assert sorted(got) == [5, 6]
    for step in (5, 6):
        assert got[step] == want[step], (step, got[step], want[step])


@pytest.mark.slow
def test_dpo_kill9_then_resume_continues_exactly(runs, session_tmp, pref_data):
    """The same through a real kill -9 of `fsdp-ft train` (full fine-tuning, so the frozen reference copy is
    rebuilt): the steps trained again after the step-4 checkpoint equal the uninterrupted run bit for bit."""
    want = losses(runs("dpo", 1, "finetune.method=full"))
    out = session_tmp / "pref-dpo-killed"
    args = [str(TINY), f"output_dir={out}", *FAST, *ONE_PROC, *_args(pref_data, "dpo", "finetune.method=full")]
    proc = subprocess.Popen([sys.executable, "-m", "fsdp_ft.cli", "train", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while 5 not in losses(out):  # the step-4 checkpoint is complete once step 5 is logged
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "step 5 not reached"
        time.sleep(0.02)
    killed_at = assert_stays_dead(out, kill9_job(proc), ranks=0)  # `fsdp-ft train`: no launcher, no rank logs
    assert killed_at < 6, "the run finished before it could be killed"
    cli("train", *args)
    resumed = losses(out)
    assert sorted(resumed) == list(range(1, 7))
    for step in (5, 6):
        assert resumed[step] == want[step], (step, resumed[step], want[step])


# ---------------------------------------------------------------- losses by hand from HF logits

def _config(tmp_path, task: str, data: Path, *extra: str):
    from fsdp_ft.config import load_config
    return load_config(TINY, [f"output_dir={tmp_path}", f"task={task}", f"data.train={data}", "data.eval=null",
                              *extra])


def _hf_models():
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(ASSETS / "tiny-llama")
    torch.manual_seed(1)
    policy = AutoModelForCausalLM.from_config(config).eval()
    torch.manual_seed(2)
    reference = AutoModelForCausalLM.from_config(config).eval()
    return AutoTokenizer.from_pretrained(ASSETS / "tiny-llama"), policy, reference


def _response_logp(model, prompt: list[int], response: list[int]) -> tuple[float, int]:
    """Sum of log p(response token | everything before it), one unpadded sequence at a time, in float64."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return sum(logp[len(prompt) + j - 1, t].item() for j, t in enumerate(response)), len(response)


def _hand_tokens(tok, row: dict) -> tuple[list[int], list[int], list[int]]:
    """The stated layout: prompt with the tokenizer's special tokens (BOS), responses then EOS."""
    prompt = tok(row["prompt"])["input_ids"]
    chosen, rejected = (tok(row[k], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                        for k in ("chosen", "rejected"))
    return prompt, chosen, rejected


def test_dpo_and_orpo_losses_equal_hand_computation(tmp_path, pref_data):
    """Four pairs of different lengths in one padded, concatenated batch: the task's loss and eval sums equal
    the formulas applied to per-sequence log-probs from the HF models' own logits."""
    from fsdp_ft.tasks.preference import DPOTask, ORPOTask

    tok, policy, reference = _hf_models()
    rows = _pairs(0, 4)
    beta, smooth, lam = 0.5, 0.1, 0.3
    room = "train.seq_len=512"  # no truncation here (it has its own test)
    dpo = DPOTask(_config(tmp_path, "dpo", pref_data["train"], f"preference.beta={beta}",
                          f"preference.label_smoothing={smooth}", room), tok)
    dpo.reference = reference
    orpo = ORPOTask(_config(tmp_path, "orpo", pref_data["train"], f"preference.orpo_lambda={lam}", room), tok)
    batch = dpo.collate([dpo.encode(r) for r in rows])
    assert len({len(dpo.encode(r)["chosen_input_ids"]) for r in rows}) > 1  # padding is exercised
    with torch.no_grad():
        got_dpo, got_orpo = dpo.loss_sums(policy, batch), orpo.loss_sums(policy, batch)

    want_dpo = want_orpo = want_margin = want_odds = 0.0
    want_correct, want_reward_correct, want_odds_correct = 0, 0, 0
    for row in rows:
        prompt, chosen, rejected = _hand_tokens(tok, row)
        (pc, nc), (pr, nr) = _response_logp(policy, prompt, chosen), _response_logp(policy, prompt, rejected)
        rc, rr = _response_logp(reference, prompt, chosen)[0], _response_logp(reference, prompt, rejected)[0]
        z = beta * ((pc - rc) - (pr - rr))
        want_dpo += -(1 - smooth) * math.log(1 / (1 + math.exp(-z))) - smooth * math.log(1 / (1 + math.exp(z)))
        want_margin += z
        want_correct += pc > pr  # DPO accuracy: the policy's log-prob comparison
        want_reward_correct += z > 0  # the implicit rewards' comparison
        mc, mr = pc / nc, pr / nr  # ORPO: length-averaged log-probs
        log_odds = (mc - math.log(1 - math.exp(mc))) - (mr - math.log(1 - math.exp(mr)))
        want_orpo += -mc + lam * math.log(1 + math.exp(-log_odds))
        want_odds += log_odds
        want_odds_correct += log_odds > 0
    assert got_dpo["count"].item() == got_orpo["count"].item() == 4
    assert got_dpo["loss"].item() == pytest.approx(want_dpo, rel=1e-5)
    assert (got_dpo["chosen_reward"] - got_dpo["rejected_reward"]).item() == pytest.approx(want_margin, rel=1e-4)
    assert got_orpo["loss"].item() == pytest.approx(want_orpo, rel=1e-5)
    assert got_orpo["log_odds_ratio"].item() == pytest.approx(want_odds, rel=1e-4)
    assert (got_dpo["correct"].item(), got_dpo["reward_correct"].item(), got_orpo["correct"].item()) == (
        want_correct, want_reward_correct, want_odds_correct)
    assert 0 < want_correct < 4 or 0 < want_reward_correct < 4  # the comparisons are not all alike


def test_ipo_hinge_and_simpo_losses_equal_hand_computation(tmp_path, pref_data):
    """The other losses on the same padded batch of four pairs, from the HF models' own logits: IPO on log-ratios
    averaged over each response's tokens, (h - 1/(2 beta))^2; SLiC's hinge max(0, 1 - beta h) on summed ones;
    SimPO, reference-free, -log sigmoid(beta (mean log-prob chosen - rejected) - gamma)."""
    from fsdp_ft.tasks import get_task

    tok, policy, reference = _hf_models()
    rows = _pairs(0, 4)
    beta, hbeta, sbeta, gamma = 0.5, 1.0, 2.5, 0.4  # hbeta: one of the four margins is past the hinge (h > 1)
    room = "train.seq_len=512"
    got = {}
    for name, task, extra in (("ipo", "dpo", [f"preference.beta={beta}", "preference.loss_type=ipo"]),
                              ("hinge", "dpo", [f"preference.beta={hbeta}", "preference.loss_type=hinge"]),
                              ("simpo", "simpo", [f"preference.simpo_beta={sbeta}",
                                                  f"preference.simpo_gamma={gamma}"])):
        t = get_task(_config(tmp_path, task, pref_data["train"], room, *extra), tok)
        t.reference = reference
        batch = t.collate([t.encode(r) for r in rows])
        with torch.no_grad():
            got[name] = t.loss_sums(policy, batch)

    want = {"ipo": 0.0, "hinge": 0.0, "simpo": 0.0, "simpo_margin": 0.0, "ipo_margin": 0.0}
    simpo_correct = past_hinge = 0
    for row in rows:
        prompt, chosen, rejected = _hand_tokens(tok, row)
        (pc, nc), (pr, nr) = _response_logp(policy, prompt, chosen), _response_logp(policy, prompt, rejected)
        rc, rr = _response_logp(reference, prompt, chosen)[0], _response_logp(reference, prompt, rejected)[0]
        h_mean = (pc - rc) / nc - (pr - rr) / nr
        want["ipo"] += (h_mean - 1 / (2 * beta)) ** 2
        want["ipo_margin"] += beta * ((pc - rc) - (pr - rr))  # rewards: summed log-ratios, as for sigmoid
        want["hinge"] += max(0.0, 1 - hbeta * ((pc - rc) - (pr - rr)))
        past_hinge += hbeta * ((pc - rc) - (pr - rr)) >= 1
        z = sbeta * (pc / nc - pr / nr) - gamma
        want["simpo"] += math.log(1 + math.exp(-z))
        want["simpo_margin"] += sbeta * (pc / nc - pr / nr)
        simpo_correct += pc / nc > pr / nr
    for name in ("ipo", "hinge", "simpo"):
        assert got[name]["count"].item() == 4
        assert got[name]["loss"].item() == pytest.approx(want[name], rel=1e-5), name
    assert 0 < past_hinge < 4  # pairs on both sides of the hinge
    assert (got["ipo"]["chosen_reward"] - got["ipo"]["rejected_reward"]).item() == pytest.approx(
        want["ipo_margin"], rel=1e-4)
    assert (got["simpo"]["chosen_reward"] - got["simpo"]["rejected_reward"]).item() == pytest.approx(
        want["simpo_margin"], rel=1e-4)
    assert got["simpo"]["correct"].item() == simpo_correct


def test_simpo_trains_on_the_toy_preference(runs, pref_data):
    """SimPO end to end (no reference model): its eval reports the pair metrics, and training on pairs whose
    rejected response is the chosen one upper-cased lowers the eval loss and raises the reward margin."""
    rows = eval_rows(runs("simpo", 1, f"data.train={pref_data['easy_train']}", f"data.eval={pref_data['easy_eval']}",
                          "train.eval_every=2"))
    assert [r["step"] for r in rows] == [2, 4, 6]
    first, last = rows[0], rows[-1]
    assert {"loss", "accuracy", "reward_margin", "chosen_reward", "rejected_reward"} <= last.keys()
    assert last["loss"] < first["loss"] and last["reward_margin"] > first["reward_margin"]


def test_reference_forward_leaves_adapters_trainable_and_checkpointed(tmp_path, pref_data):
    """peft's disable_adapter() toggles requires_grad; under FSDP2 with reshard_after_forward=false that froze the
    sharded adapters, and checkpoints (trainable parameters only) came out empty. The reference forward must
    leave what trains, and what a checkpoint holds, as it was."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from fsdp_ft.runtime import distributed
    from fsdp_ft.training import fsdp_engine

    cfg = _config(tmp_path, "dpo", pref_data["train"], "finetune.method=lora", "fsdp.reshard_after_forward=false",
                  "train.seq_len=64")
    built = fsdp_engine.build(cfg, distributed.init_distributed())
    model, task, splits = built.model, built.data.task, built.data.splits
    batch = task.collate([task.encode(splits.train[i]) for i in range(2)])

    def saved() -> set[str]:
        return set(get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True)))

    before = saved()
    assert len(before) == sum(1 for n, _ in model.named_parameters() if ".lora_" in n) > 0
    task.reference_logps(model, batch)
    assert saved() == before
    task.loss_sums(model, batch)["loss"].backward()  # and the policy forward after it still trains them
    assert saved() == before


def test_dpo_without_reference_or_adapters_says_what_is_missing(tmp_path, pref_data):
    """A full model with no reference attached (e.g. loaded outside `fsdp-ft train`) fails with one clear line."""
    from fsdp_ft.errors import ConfigError
    from fsdp_ft.tasks.preference import DPOTask

    tok, policy, _ = _hf_models()
    task = DPOTask(_config(tmp_path, "dpo", pref_data["train"]), tok)
    with pytest.raises(ConfigError, match="needs its reference model"):
        task.loss_sums(policy, task.collate([task.encode(r) for r in _pairs(0, 2)]))


# ---------------------------------------------------------------- reward model

def test_reward_model_learns_toy_preference_and_exports_hf_classifier(tmp_path, pref_data):
    """Pair accuracy on held-out pairs: the untrained model (same seed, same init) vs after 8 steps; final/ is an
    AutoModelForSequenceClassification with one output whose scores equal the trained model's."""
    from transformers import AutoModelForSequenceClassification

    from fsdp_ft import api
    from fsdp_ft.config import load_config
    from fsdp_ft.runtime import distributed
    from fsdp_ft.training import fsdp_engine

    cfg = load_config(TINY, [f"output_dir={tmp_path / 'run'}", *FAST, "task=reward", "train.max_steps=8",
                             f"data.train={pref_data['easy_train']}", f"data.eval={pref_data['easy_eval']}",
                             "data.max_eval_samples=32", "train.micro_batch_size=8", "train.grad_accum=1",
                             "optim.lr=3e-3", "optim.warmup_steps=2", "train.eval_batch_size=16"])
    env = distributed.init_distributed()
    built = fsdp_engine.build(cfg, env)
    model, task, splits = built.model, built.data.task, built.data.splits
    eval_batch = task.collate([task.encode(r) for r in splits.eval])
    with torch.no_grad():
        before = task.metrics({k: v.item() for k, v in task.loss_sums(model.eval(), eval_batch).items()})
    del model

    result = api.train(cfg)
    after = eval_rows(result.output_dir)[-1]
    assert after["accuracy"] >= 0.9 and after["accuracy"] >= before["accuracy"] + 0.3, (before, after)
    assert after["reward_margin"] > before["reward_margin"]

    exported = AutoModelForSequenceClassification.from_pretrained(result.output_dir / "final").eval()
    assert exported.config.num_labels == 1
    with torch.no_grad():
        want = result.model.eval()(input_ids=eval_batch["input_ids"], attention_mask=eval_batch["attention_mask"])
        got = exported(input_ids=eval_batch["input_ids"], attention_mask=eval_batch["attention_mask"])
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- formats, truncation, bad rows

def _task(tmp_path, data: Path, *extra: str):
    from fsdp_ft.tasks import get_task
    from transformers import AutoTokenizer

    cfg = _config(tmp_path, "dpo", data, *extra)
    return get_task(cfg, AutoTokenizer.from_pretrained(ASSETS / "tiny-llama")), cfg


def test_chat_pairs_render_with_template_and_only_the_last_assistant_turn_carries_loss(tmp_path):
    """Chat-list rows: shared turns plus differing final assistant turns. Token by token: the prompt is the
    rendered conversation up to the generation prompt and carries no loss; every response token carries its own
    id as label; chosen and rejected share the prompt tokens."""
    from fsdp_ft.data.splits import load_splits
    from fsdp_ft.tasks.causal_lm import IGNORE

    shared = [{"role": "system", "content": "Answer briefly."},
              {"role": "user", "content": "What does the io module provide?"}]
    row = {"chosen": shared + [{"role": "assistant", "content": "Interfaces to stream handling."}],
           "rejected": shared + [{"role": "assistant", "content": "It sends mail."}]}
    data = _write(tmp_path / "chat.jsonl", [row, row])
    task, cfg = _task(tmp_path, data)
    splits = load_splits(cfg, task)
    enc = task.encode(splits.train[0])
    tok = task.tok
    prompt_len = sum(1 for label in enc["chosen_labels"] if label == IGNORE)
    prompt = enc["chosen_input_ids"][:prompt_len]
    assert enc["rejected_input_ids"][:prompt_len] == prompt
    assert all(label == IGNORE for label in enc["rejected_labels"][:prompt_len])
    assert tok.decode(prompt) == ("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n"
                                  "What does the io module provide?<|im_end|>\n<|im_start|>assistant\n")
    for side, answer in (("chosen", "Interfaces to stream handling."), ("rejected", "It sends mail.")):
        ids, labels = enc[f"{side}_input_ids"], enc[f"{side}_labels"]
        assert labels[prompt_len:] == ids[prompt_len:]  # every response token is labelled with itself
        assert tok.decode(ids[prompt_len:]) == answer + "<|im_end|>\n"


def test_truncation_keeps_responses_and_cuts_prompt_from_the_left(tmp_path, pref_data):
    from fsdp_ft.tasks.causal_lm import IGNORE

    task, _ = _task(tmp_path, pref_data["train"], "train.seq_len=24")
    tok = task.tok
    long_prompt = " ".join(_paragraphs()[3].split()[:40])
    row = {"prompt": long_prompt, "chosen": "Return the index.", "rejected": "Open a socket and read it."}
    enc = task.encode(row)
    prompt_ids = tok(long_prompt)["input_ids"]
    rejected_ids = tok(row["rejected"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    kept = 24 - len(rejected_ids)  # the longer response sets the room left for the prompt
    assert len(enc["rejected_input_ids"]) == 24
    for side in ("chosen", "rejected"):
        assert enc[f"{side}_input_ids"][:kept] == prompt_ids[-kept:]  # the prompt's end survives
        assert enc[f"{side}_labels"][:kept] == [IGNORE] * kept
    assert enc["rejected_input_ids"][kept:] == rejected_ids  # the response is whole
    # a response longer than seq_len - 1 keeps its start and one prompt token
    enc = task.encode({**row, "chosen": long_prompt})
    assert len(enc["chosen_input_ids"]) == 24 and enc["chosen_labels"][0] == IGNORE
    assert enc["chosen_input_ids"][1:] == tok(long_prompt, add_special_tokens=False)["input_ids"][:23]


BAD_ROWS = {
    "empty_chosen": ({"prompt": "p", "chosen": "  ", "rejected": "r"}, "row 2: column 'chosen' is empty"),
    "missing_rejected": ({"prompt": "p", "chosen": "c", "rejected": None}, "row 2: column 'rejected' is empty"),
    "unknown_role": ({"chosen": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}],
                      "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]},
                     "row 2: column 'chosen' message 2 has unknown role 'robot'"),
    "turns_differ": ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]},
                     "row 2: columns 'chosen' and 'rejected' must share every turn"),
    "no_assistant_last": ({"chosen": [{"role": "user", "content": "q"}],
                           "rejected": [{"role": "user", "content": "q"}]},
                          "row 2: column 'chosen' must end with a non-empty assistant message"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_rows_fail_naming_file_and_row(tmp_path, case):
    from fsdp_ft.data.splits import load_splits
    from fsdp_ft.errors import DataError

    bad, message = BAD_ROWS[case]
    good = ({"prompt": "p", "chosen": "c", "rejected": "r"} if "prompt" in bad else
            {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
             "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]})
    data = _write(tmp_path / f"{case}.jsonl", [good, bad, good])
    task, cfg = _task(tmp_path, data)
    with pytest.raises(DataError) as err:
        load_splits(cfg, task)
    text = str(err.value)
    assert "\n" not in text and f"file '{data}'" in text and message in text, text


def test_missing_column_names_the_preference_key(tmp_path):
    from fsdp_ft.data.splits import load_splits
    from fsdp_ft.errors import DataError

    data = _write(tmp_path / "nocol.jsonl", [{"prompt": "p", "chosen": "c", "worse": "r"}])
    task, cfg = _task(tmp_path, data)
    with pytest.raises(DataError, match=r"has no column 'rejected'.*preference\.rejected_column"):
        load_splits(cfg, task)
    data = _write(tmp_path / "noprompt.jsonl", [{"question": "p", "chosen": "c", "rejected": "r"}])
    task, cfg = _task(tmp_path, data)
    with pytest.raises(DataError, match=r"row 1: .*prompt column 'prompt' is needed.*preference\.prompt_column"):
        load_splits(cfg, task)
