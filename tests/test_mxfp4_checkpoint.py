"""gpt-oss as OpenAI publishes it: each expert stack stored as MXFP4 `_blocks` and `_scales`, config.json saying
`quant_method: mxfp4`. The stacks here are encoded by hand (random 4-bit E2M1 codes, two a byte with the low
nibble first, and one power-of-two scale per 32 values, biased by 127), so the values every test expects are
known without any decoder; the plain reference folder holds those values as ordinary weights."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import TINY, cli
from test_moe import SAMPLE, _cfg, save_tiny_moe

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
STACKS = ("gate_up_proj", "down_proj")


def _encode(experts: int, n_in: int, n_out: int, gen: torch.Generator):
    """(values [experts, in, out] as the model holds them, blocks, scales as the checkpoint stores them)."""
    codes = torch.randint(0, 16, (experts, n_out, n_in), generator=gen)
    exponents = torch.randint(-5, 2, (experts, n_out, n_in // 32), generator=gen)
    values = torch.tensor(E2M1)[codes] * torch.exp2(exponents.float()).repeat_interleave(32, dim=-1)
    packed = (codes[..., 0::2] | codes[..., 1::2] << 4).to(torch.uint8)
    return (values.transpose(1, 2).contiguous(), packed.reshape(experts, n_out, n_in // 32, 16),
            (exponents + 127).to(torch.uint8))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny gpt-oss twice: `mxfp4` as the hub stores it, `plain` with the same values as ordinary weights."""
    root = tmp_path_factory.mktemp("gpt-oss")
    plain = save_tiny_moe(root / "plain", "gpt_oss")
    with safe_open(str(plain / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    gen = torch.Generator().manual_seed(3)
    quantized, values = dict(tensors), {}
    for key in [k for k in tensors if k.endswith(STACKS)]:
        experts, n_in, n_out = tensors[key].shape
        values[key], quantized[key + "_blocks"], quantized[key + "_scales"] = _encode(experts, n_in, n_out, gen)
        del quantized[key]
        tensors[key] = values[key]
    save_file(tensors, str(plain / "model.safetensors"), metadata={"format": "pt"})
    mxfp4 = root / "mxfp4"
    mxfp4.mkdir()
    for f in plain.iterdir():
        if f.name != "model.safetensors":
            (mxfp4 / f.name).write_bytes(f.read_bytes())
    save_file(quantized, str(mxfp4 / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((mxfp4 / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                                      "model.embed_tokens", "lm_head"]}
    (mxfp4 / "config.json").write_text(json.dumps(config))
    return {"plain": plain, "mxfp4": mxfp4, "values": values}


def test_mxfp4_stacks_load_as_the_values_they_encode(tmp_path, folders):
    """Before: the run stopped at start, the checkpoint having no `gate_up_proj`. Now every stack equals its
    hand-decoded values exactly (so do transformers' own MXFP4 loading's: the hand encoding is the hub's), and
    the logits equal transformers' on the plain folder."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    theirs = AutoModelForCausalLM.from_pretrained(folders["mxfp4"], quantization_config=Mxfp4Config(dequantize=True))
    for key, want in folders["values"].items():
        torch.testing.assert_close(theirs.get_parameter(key), want, rtol=0, atol=0)

    from fsdp_ft.runtime import distributed
    from fsdp_ft.training import fsdp_engine

    built = fsdp_engine.build(_cfg(tmp_path, folders["mxfp4"]), distributed.init_distributed())
    model = built.model.eval()
    for key, want in folders["values"].items():
        torch.testing.assert_close(model.get_parameter(key).full_tensor(), want, rtol=0, atol=0)
    assert getattr(model.config, "quantization_config", None) is None  # the model is a plain one
    ref = AutoModelForCausalLM.from_pretrained(folders["plain"]).eval()
    batch = built.data.tokenizer(SAMPLE, return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch, use_cache=False).logits, ref(**batch).logits, rtol=1e-5, atol=1e-5)


def test_two_ranks_decode_their_own_experts_and_export_a_plain_folder(tmp_path, folders):
    """Full fine-tuning on 2 ranks (each reads and decodes only the experts of its shard) with lr 0: the exported
    folder has no MXFP4 entry and its tensors equal the plain folder's bit for bit, so transformers and any other
    tool load it. (QLoRA reads the decoded stack whole, as the 1-process load above does, then stores it in NF4:
    tests/test_qlora_experts.py.)"""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    cli("run", "--nproc-per-node", "2", str(TINY), f"output_dir={run}", f"model.path={folders['mxfp4']}",
        "model.random_init=false", "optim.lr=0", "optim.weight_decay=0", "train.max_steps=1", "train.eval_every=0")
    assert "quantization_config" not in json.loads((run / "final" / "config.json").read_text())
    exported, plain = load_file(str(run / "final" / "model.safetensors")), load_file(str(folders["plain"] /
                                                                                          "model.safetensors"))
    assert sorted(exported) == sorted(plain)
    for key, want in plain.items():
        assert torch.equal(exported[key], want), key
