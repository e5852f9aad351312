"""Hugging Face export and import, checked against the real `transformers` package (DESIGN 11)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import single_process_trainer, tiny_job, write_checkpoint

from moe_ray.hf import LayoutError
from moe_ray.hf.export import export_checkpoint
from moe_ray.hf.folder import CONFIG, load_into, open_folder
from moe_ray.hf.init_from import check_init_from, load_init_from
from moe_ray.hf.tokenizer import PROBE
from moe_ray.inference import generate, load_model
from moe_ray.train.step import LocalBias
from moe_ray.train.trainer import build_model

transformers = pytest.importorskip("transformers")  # the `hf` extra (in `dev`)
CLI = Path(sys.executable).parent / "moe-ray"


def hf_job(storage, **overrides):
    """The tiny job with group-limited routing, so HF's group masking is exercised too."""
    return tiny_job(storage, model__moe__n_group=4, model__moe__topk_group=2, **overrides)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(job, checkpoint folder, export folder) of a briefly trained model whose balance bias has
    negative entries (a masked expert must lose to them: HF masks with -inf, not 0)."""
    root = tmp_path_factory.mktemp("hf")
    job = hf_job(root / "runs", train__steps=60)
    trainer = single_process_trainer(job)
    trainer.fit()
    bias = torch.randn(trainer.model.get_expert_bias().shape, generator=torch.Generator().manual_seed(0)) * 0.05
    trainer.model.set_expert_bias(-0.1 - bias.abs())  # all negative: a 0 fill would win
    folder = write_checkpoint(root / "ckpt" / "step-00000060", job, trainer.model)
    export_checkpoint(str(folder), root / "export")
    return job, folder, root / "export"


def load_hf(folder):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32, output_loading_info=True
    )
    return model.eval(), info


def test_transformers_logits_equal_moe_ray_logits(trained):
    job, ckpt_folder, export = trained
    ours = load_model(str(ckpt_folder), torch.device("cpu")).model
    assert (ours.get_expert_bias() < 0).all()
    hf, info = load_hf(export)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    # transformers has no MTP layers: those (and only those) are left over.
    mtp_layer = f"model.layers.{job.model.n_layers}."
    assert info["unexpected_keys"] and all(k.startswith(mtp_layer) for k in info["unexpected_keys"])
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(tokens) - hf(tokens).logits).abs().max().item()
        assert diff <= 1e-4
        # The exported bias takes part in routing: without it HF's logits move.
        for layer in hf.model.layers[job.model.n_dense_layers :]:
            layer.mlp.gate.e_score_correction_bias.zero_()
        assert (ours(tokens) - hf(tokens).logits).abs().max().item() > 1e-3


def test_transformers_greedy_generation_equals_moe_ray_generate(trained):
    _, ckpt_folder, export = trained
    hf, _ = load_hf(export)
    tok = transformers.AutoTokenizer.from_pretrained(str(export))
    prompt = "    def __init__(self"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == list(prompt.encode())
    hf_new = hf.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1] :].tolist()
    ours = load_model(str(ckpt_folder), torch.device("cpu")).model
    assert generate(ours, list(prompt.encode()), 24, temperature=0)[1] == hf_new
    out = subprocess.run(
        [str(CLI), "generate", str(ckpt_folder), "--prompt", prompt, "--max-new-tokens", "24", "--temperature", "0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip("\n") == prompt + tok.decode(hf_new)


def test_config_states_every_field_vllm_reads(trained):
    job, _, export = trained
    config = json.loads((export / CONFIG).read_text())
    assert config["architectures"] == ["Glm4MoeForCausalLM"] and config["model_type"] == "glm4_moe"
    # vLLM assumes 0.5 when absent; transformers 5 reads rope_parameters.
    assert config["partial_rotary_factor"] == 1.0 and config["rope_parameters"]["partial_rotary_factor"] == 1.0
    assert config["num_nextn_predict_layers"] == job.model.mtp.depth == 1
    assert config["num_key_value_heads"] == config["num_attention_heads"] == job.model.n_heads
    assert config["head_dim"] == job.model.d_model // job.model.n_heads
    assert config["attention_bias"] is False and config["use_qk_norm"] is False
    assert config["n_group"] == 4 and config["topk_group"] == 2 and config["first_k_dense_replace"] == 1
    # The MTP module where vLLM's glm4_moe_mtp reads it, with DeepSeek's [embedding; hidden] order.
    with open_folder(str(export)) as folder, folder.reader() as read:
        layer = f"model.layers.{job.model.n_layers}"
        ours = load_model(str(trained[1]), torch.device("cpu")).model
        proj = ours.mtp[0].proj.weight
        d = job.model.d_model
        assert torch.equal(read(f"{layer}.eh_proj.weight")[:, :d], proj[:, d:])
        for name in ("enorm", "hnorm", "shared_head.norm", "shared_head.head", "embed_tokens"):
            read(f"{layer}.{name}.weight")
        assert torch.equal(read(f"{layer}.mlp.gate.e_score_correction_bias"), ours.mtp[0].block.ffn.router.expert_bias)
        assert read(f"{layer}.mlp.gate.e_score_correction_bias").dtype == torch.float32


def test_export_import_export_is_bit_exact(trained, tmp_path):
    job, _, export = trained
    model = build_model(job.model, job.balance, seed=123, device=torch.device("cpu"))  # other weights
    with open_folder(str(export)) as folder, folder.reader() as read:
        load_into(model, read)
    again = write_checkpoint(tmp_path / "ckpt" / "step-00000001", job, model)
    export_checkpoint(str(again), tmp_path / "export2")
    names = sorted(p.name for p in export.iterdir() if p.name != "moe_ray_export.json")  # it names its source
    assert names == sorted(p.name for p in (tmp_path / "export2").iterdir() if p.name != "moe_ray_export.json")
    for name in names:  # weights, index, config and tokenizer files
        assert (export / name).read_bytes() == (tmp_path / "export2" / name).read_bytes(), name


def test_sharded_export_loads_the_same(trained, tmp_path):
    _, ckpt_folder, export = trained
    export_checkpoint(str(ckpt_folder), tmp_path / "sharded", max_shard_bytes=50_000)
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 3
    one, many = load_hf(export)[0].state_dict(), load_hf(tmp_path / "sharded")[0].state_dict()
    assert one.keys() == many.keys() and all(torch.equal(one[k], many[k]) for k in one)


def test_a_tokenizer_json_job_exports_its_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        [PROBE, "def f(x): return x + 1", "class A: pass"] * 20,
        trainers.BpeTrainer(vocab_size=200, special_tokens=["[UNK]"]),
    )
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    job = hf_job(tmp_path / "runs", data__tokenizer=str(path), data__source=str(tmp_path))
    folder = write_checkpoint(tmp_path / "ckpt", job)
    with pytest.raises(Exception, match="--tokenizer"):  # never opens a path the checkpoint names
        export_checkpoint(str(folder), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    # A --tokenizer that is not there is named as what was given, not as the job's data.tokenizer.
    with pytest.raises(LayoutError, match=r"^the tokenizer '.*/nope.json' is not a file \(give a tokenizer.json"):
        export_checkpoint(str(folder), tmp_path / "refused", tokenizer=str(tmp_path / "nope.json"))
    assert not (tmp_path / "refused").exists()
    export_checkpoint(str(folder), tmp_path / "export", tokenizer=str(path))
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "export"))
    text = "def f(x): return x + 1\nclass A: pass"
    assert auto(text)["input_ids"] == tok.encode(text).ids


def test_byte_tokenizer_round_trips_any_text(trained):
    auto = transformers.AutoTokenizer.from_pretrained(str(trained[2]))
    for text in (PROBE, "\x00\x01 \t\n\r", "ÿ€𝄞"):
        ids = auto(text)["input_ids"]
        assert ids == list(text.encode("utf-8"))
        assert auto.decode(ids) == text


def test_models_glm4_moe_cannot_carry_are_refused(tmp_path):
    job = hf_job(tmp_path / "runs", model__moe__score_func="softmax")
    folder = write_checkpoint(tmp_path / "ckpt", job)
    out = subprocess.run([str(CLI), "export", str(folder), str(tmp_path / "out")], capture_output=True, text=True)
    assert out.returncode == 1 and "model.moe.score_func=softmax" in out.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_export_never_overwrites(trained, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep me")
    with pytest.raises(LayoutError, match="already exists"):
        export_checkpoint(str(trained[1]), tmp_path / "busy")
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["mine.txt"]
    # A place that cannot be written is named before the checkpoint is read (it was a traceback
    # from the staging folder's mkdtemp).
    (tmp_path / "a-file").write_text("")
    with pytest.raises(LayoutError, match="cannot write .*a-file/out: .*give a folder you can write to"):
        export_checkpoint(str(trained[1]), tmp_path / "a-file" / "out")
    prepared = subprocess.run(
        [str(CLI), "prepare", "builtin", str(tmp_path / "a-file" / "data")], capture_output=True, text=True
    )
    assert prepared.returncode == 1 and "give a folder you can write to" in prepared.stderr, prepared.stderr
    # An export given where a checkpoint is expected says what it is and what reads it.
    again = subprocess.run(
        [str(CLI), "export", str(trained[2]), str(tmp_path / "again")], capture_output=True, text=True
    )
    assert again.returncode == 1 and "is a Hugging Face model folder, not a moe-ray checkpoint" in again.stderr


def test_init_from_names_every_mismatch(trained, tmp_path):
    job, _, export = trained
    other = hf_job(tmp_path, model__d_model=64, model__moe__n_routed_experts=16, model__init_from=str(export))
    with pytest.raises(LayoutError) as err:
        check_init_from(other)
    assert "hidden_size=32 but the job has model.d_model=64" in str(err.value)
    assert "n_routed_experts=8 but the job has model.moe.n_routed_experts=16" in str(err.value)
    # A published-style config that moe-ray's attention cannot reproduce.
    partial = tmp_path / "partial"
    partial.mkdir()
    for f in export.iterdir():
        (partial / f.name).write_bytes(f.read_bytes())
    config = json.loads((partial / CONFIG).read_text())
    del config["rope_parameters"]["partial_rotary_factor"], config["partial_rotary_factor"]
    config["num_key_value_heads"] = 1
    (partial / CONFIG).write_text(json.dumps(config))
    with pytest.raises(LayoutError) as err:
        check_init_from(job.model_copy(update={"model": job.model.model_copy(update={"init_from": str(partial)})}))
    assert "partial_rotary_factor=0.5" in str(err.value) and "num_key_value_heads=1" in str(err.value)
    # A job whose tokenizer encodes differently from the folder's.
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Tokenizer(models.WordLevel({"[UNK]": 0, "def": 1}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.save(str(tmp_path / "words.json"))
    fit = hf_job(tmp_path, model__init_from=str(export), data__tokenizer=str(tmp_path / "words.json"))
    with pytest.raises(LayoutError, match="tokenizer encodes text differently"):
        check_init_from(fit)
    # The validate command shows the same, with exit code 2.
    job_file = tmp_path / "job.yaml"
    job_file.write_text(json.dumps(other.model_dump(mode="json")))
    out = subprocess.run([str(CLI), "validate", str(job_file)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "model.d_model=64" in out.stderr


@pytest.mark.slow
def test_training_starts_from_the_export_on_ray(local_ray, trained, tmp_path):
    """2 workers (EP=2, FSDP) load their own experts from the folder; the run equals one process
    started from the same folder, and starts at the trained model's loss, not at a fresh one's."""
    from moe_ray.runtime.driver import run_job

    job = hf_job(tmp_path / "runs", train__steps=3, model__init_from=str(trained[2]))
    check_init_from(job)
    result = run_job(job, run_name="from-hf")
    trainer = single_process_trainer(job)
    load_init_from(trainer.model, str(trained[2]))
    trainer.bias = LocalBias(trainer.model.get_expert_bias(), job.balance, job.train.steps)
    summary = trainer.fit()
    losses = [m["loss"] for m in result.progress.metrics]
    np.testing.assert_allclose(losses, [r.loss for r in summary.history], rtol=2e-5, atol=1e-6)
    fresh = single_process_trainer(job)
    assert losses[0] < fresh.run_step().loss - 1.0


def test_a_model_without_shared_experts_exports_too(tmp_path):
    job = hf_job(tmp_path / "runs", model__moe__n_shared_experts=0)
    folder = write_checkpoint(tmp_path / "ckpt", job)
    export_checkpoint(str(folder), tmp_path / "export")
    hf, info = load_hf(tmp_path / "export")
    assert not info["missing_keys"]  # glm4_moe always has a shared MLP: it gets zero width
    tokens = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = load_model(str(folder), torch.device("cpu")).model
        assert (ours(tokens) - hf(tokens).logits).abs().max().item() <= 1e-4
