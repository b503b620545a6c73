"""Loading and checkpointing the policy."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tasks.model import ModelLoadError, live_policy, load_model, move_live_policy, save_checkpoint


def test_checkpoint_round_trips_through_from_pretrained(tmp_path, tiny_model_dir):
    policy = live_policy(str(tiny_model_dir))
    policy.optimizer = torch.optim.AdamW(policy.model.parameters(), lr=1e-3)
    out = save_checkpoint(policy, tmp_path / "checkpoint")
    assert (out / "model.safetensors").exists() and (out / "optimizer.pt").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    for (name, a), (_, b) in zip(policy.model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a.cpu().float(), b.float()), name
    assert AutoTokenizer.from_pretrained(out).encode("12+34=") == policy.tokenizer.encode("12+34=")
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]  # no temp folder left


def test_missing_model_folder_is_one_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match=r"model folder '.*nope' does not exist"):
        load_model(str(tmp_path / "nope"), torch.device("cpu"), torch.float32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"cannot load model '.*empty'"):
        load_model(str(tmp_path / "empty"), torch.device("cpu"), torch.float32)


def test_live_policy_is_reused_not_reloaded(tmp_path, tiny_model_dir):
    first = live_policy(str(tiny_model_dir))
    assert live_policy(str(tiny_model_dir)) is first
    move_live_policy(str(tiny_model_dir), tmp_path / "iter-0001" / "checkpoint")
    # The updated weights now answer to the new path, never to the old one.
    assert live_policy(str(tmp_path / "iter-0001" / "checkpoint")) is first
