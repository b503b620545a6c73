"""GRPO against PPO with a learned critic, on identical work: what DeepSeekMath (arXiv:2402.03300)
claims GRPO saves (the value model's memory) and whether it costs stability.

    python benchmarks/ppo.py --seeds 0,1,2,3,4 --iterations 30          # tiny default task, stability
    python benchmarks/ppo.py --model smollm2 --seeds 0 --iterations 2 --prompts 4 --group-size 4 \
        --max-new-tokens 64 --micro-batch 8

Both algorithms run in this one harness, in fresh processes, interleaved seed by seed, with the
same model, prompts, completions per prompt (G), sampling, completion length, learning rate,
optimiser (AdamW, grad-norm clip 1), micro-batches and seeds; each takes one optimiser step per
iteration (GRPO's mu = 1, the product's default). Shared, from the product: sampling
(tasks.generate.sample), the batch layout and log-probs (tasks.logprobs, chunked), the reference
forward (the reference model loaded for it and freed, as the generate stage does), the clipped
surrogate (tasks.objective.clipped_surrogate) and the reward (rewards: exact_answer on the tiny
task). TRL's `trl.experimental.ppo.PPOTrainer` was not used: it scores with a reward *model*
(a sequence-classification network called on the token ids), so our verifiable reward would
have to pose as one, and it also keeps the policy, value, reference and reward networks all
in memory at once, which would not be the comparison DeepSeekMath makes.

GRPO (the product's math, tasks.objective): A_i = (r_i - mean_g r) / (std_g r + 1e-4) per group of
G; loss = 1/B sum_i 1/|o_i| sum_t [-min(w A_i, clip(w) A_i) + beta k3_t], k3 the KL estimator
of DeepSeekMath eq. 4 against the reference, beta = 0.04.

PPO, as DeepSeekMath sec. 4.1 (eq. 1 and 2) describes the baseline it compares against:
  value model   V_psi: a copy of the policy's transformer (same size, initialised from the policy's
                weights) with a scalar head Linear(H, 1), head initialised to 0; its own AdamW at
                the same learning rate. V(s_t) is read at the position that predicts token t.
  reward        r_t = -beta (log pi_old(o_t) - log pi_ref(o_t)) + [t = T] r(q, o): the KL penalty
                per token in the reward and the outcome reward at the last token (DeepSeekMath eq. 2),
                beta = 0.04 as the GRPO run; pi_old from a no-grad forward of the sampling policy.
  GAE           delta_t = r_t + gamma V_old(s_{t+1}) - V_old(s_t) (V after the last token = 0),
                A_t = sum_l (gamma lambda)^l delta_{t+l}  (Schulman et al. 2016, arXiv:1506.02438, eq. 16),
                gamma = 1, lambda = 0.95; returns R_t = A_t + V_old(s_t); A whitened over the batch's
                tokens (TRL PPOTrainer, OpenRLHF).
  policy loss   -min(w A_t, clip(w, 1 - 0.2, 1 + 0.2) A_t), token mean over the batch (PPO, Schulman
                et al. 2017, eq. 7).
  value loss    1/2 max((V - R)^2, (clip(V, V_old - 0.2, V_old + 0.2) - R)^2), token mean, weight
                vf_coef = 0.1 (clipped value loss of OpenAI baselines' ppo2 and TRL's PPOTrainer;
                gamma, lambda, cliprange_value and vf_coef are TRL PPOConfig's defaults).

Reported per run: mean reward per iteration, held-out greedy accuracy at the start, every
--eval-every iterations and the end, seconds per iteration (median), and the update's peak RSS
(the kernel's high-water mark reset before the update phase: weights, gradients, optimiser
states, activations; for PPO both networks). A run *collapsed* when its held-out accuracy at
each of the last two evaluations is below its start; its *fall* is the largest drop of held-out
accuracy from its best so far. Across seeds: the spread of the reward curves and of each run's
reward gain. `--summarize summary-tiny.json` prints that again. Nothing here is asserted by a test.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (sets the offline/quiet environment and sys.path)
from common import ROOT, machine_info, reset_peak_rss, set_threads, status_mib

PYTHON = sys.executable
GAMMA, LAMBDA, CLIP, CLIP_VALUE, VF_COEF, BETA = 1.0, 0.95, 0.2, 0.2, 0.1, 0.04


# ----------------------------------------------------------------------------- PPO math


def gae(rewards, values, mask, gamma: float = GAMMA, lam: float = LAMBDA):
    """Generalised advantage estimates and returns.  rewards, values, mask (B, C) -> (B, C), (B, C)

    Padding (mask 0) sits after each completion's last token, so V beyond the last real token
    is taken as 0 and padding gets A = 0."""
    import torch

    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, advantages + values


def token_rewards(outcome, old_logp, ref_logp, mask, beta: float = BETA):
    """r_t = -beta (log pi_old - log pi_ref) + [t = last] r.  outcome (B,), others (B, C) -> (B, C)"""
    import torch

    rewards = -beta * (old_logp - ref_logp) * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)  # (B,) index of each completion's last token
    return rewards + torch.zeros_like(rewards).scatter(1, last.unsqueeze(1), outcome.unsqueeze(1)) * (
        mask.sum(1, keepdim=True) > 0
    )


def clipped_value_loss(values, old_values, returns, mask, clip: float = CLIP_VALUE):
    """1/2 max((V - R)^2, (clip(V, V_old +- clip) - R)^2), summed over masked tokens.  (B, C) -> ()"""
    import torch

    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * (torch.maximum((values - returns) ** 2, (clipped - returns) ** 2) * mask).sum()


class ValueModel:
    """The policy's transformer, copied (same size, same initial weights), with a scalar head."""

    def __init__(self, policy):
        import torch

        from tasks.logprobs import causal_lm

        lm = causal_lm(policy)
        self.body = copy.deepcopy(getattr(lm, lm.base_model_prefix))
        self.head = torch.nn.Linear(lm.config.hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def parameters(self):
        return [*self.body.parameters(), *self.head.parameters()]

    def train(self, on: bool = True):
        self.body.train(on)

    def __call__(self, batch):
        """V(s_t) at the position predicting each completion token.  -> (B, C)"""
        width = batch.completion_ids.shape[1]
        hidden = self.body(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        ).last_hidden_state[:, -width - 1 : -1]  # (B, C, H)
        return self.head(hidden).squeeze(-1).float() * batch.completion_mask  # (B, C)


# ----------------------------------------------------------------------------- one run


def _hf_engine(model, tok):
    from tasks.engines.hf import HFEngine

    engine = HFEngine()
    engine.load(model, tok)
    return engine


def _eval(model, tok, problems, max_new_tokens, reward) -> float:
    from tasks.engines import SamplingSettings

    ids = [tok(p["prompt"], add_special_tokens=False)["input_ids"] for p in problems]
    greedy = SamplingSettings(max_new_tokens=max_new_tokens, greedy=True, batch_size=256, with_logprobs=False)
    samples = _hf_engine(model, tok).sample(ids, 1, greedy, desc="evaluate")
    texts = tok.batch_decode([s.completion_ids for s in samples], skip_special_tokens=True)
    return sum(reward(t, p) >= 1.0 for t, p in zip(texts, problems, strict=True)) / len(problems)


def run_one(a: argparse.Namespace) -> dict:
    import torch

    from tasks.engines import SamplingSettings
    from tasks.generate import render_prompt
    from tasks.logprobs import batched_completion_logprobs, completion_logprobs, pack
    from tasks.model import load_model, load_tokenizer
    from tasks.objective import BatchTotals, LossSettings, clipped_surrogate, group_advantages, policy_loss

    random.seed(a.seed)
    torch.manual_seed(a.seed)
    model_path, problems, held_out, reward, chat = setup_task(a)
    cpu = torch.device("cpu")
    policy = load_model(model_path, cpu, torch.float32)
    tok = load_tokenizer(model_path)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=a.lr)
    value = value_opt = None
    if a.algorithm == "ppo":
        value = ValueModel(policy)
        value_opt = torch.optim.AdamW(value.parameters(), lr=a.lr)
    rng = random.Random(a.seed)
    loss_settings = LossSettings(beta=BETA, epsilon_low=CLIP, epsilon_high=CLIP)
    out = {
        "algorithm": a.algorithm,
        "seed": a.seed,
        "rewards": [],
        "seconds": [],
        "update_seconds": [],
        "update_peak_mib": [],
        "before_update_mib": [],
        "evals": {},
        "value_loss": [],
    }
    if held_out:
        out["evals"][0] = _eval(policy, tok, held_out, a.max_new_tokens, reward)
    for it in range(1, a.iterations + 1):
        started = time.perf_counter()
        batch_problems = [rng.choice(problems) for _ in range(a.prompts)]
        prompt_ids = [tok(render_prompt(p, tok, chat), add_special_tokens=False)["input_ids"] for p in batch_problems]
        samples = _hf_engine(policy, tok).sample(
            prompt_ids,
            a.group_size,
            SamplingSettings(max_new_tokens=a.max_new_tokens, batch_size=a.prompts * a.group_size, with_logprobs=False),
        )
        texts = tok.batch_decode([s.completion_ids for s in samples], skip_special_tokens=True)
        outcome = torch.tensor(
            [reward(t, batch_problems[s.prompt_index]) for t, s in zip(texts, samples, strict=True)],
            dtype=torch.float32,
        )
        prompts = [prompt_ids[s.prompt_index] for s in samples]
        completions = [s.completion_ids for s in samples]
        # reference forward, reference loaded for it and freed (as the generate stage)
        ref = load_model(model_path, cpu, torch.float32).eval()
        ref_lists = batched_completion_logprobs(ref, prompts, completions, tok.pad_token_id, 1.0, a.micro_batch)
        ref.to("meta")
        del ref
        n = len(samples)
        micro = [list(range(s, min(s + a.micro_batch, n))) for s in range(0, n, a.micro_batch)]
        batches = [pack([prompts[i] for i in m], [completions[i] for i in m], tok.pad_token_id, cpu) for m in micro]
        refs = [_pad([ref_lists[i] for i in m], b.completion_ids.shape[1]) for m, b in zip(micro, batches, strict=True)]
        if a.algorithm == "ppo":
            policy.eval()
            value.train(False)
            with torch.no_grad():
                olds = [completion_logprobs(policy, b, 1.0) for b in batches]
                old_values = [value(b) for b in batches]
            token_adv, returns = [], []
            for m, b, old, ref_lp, v in zip(micro, batches, olds, refs, old_values, strict=True):
                adv_t, ret = gae(token_rewards(outcome[m], old, ref_lp, b.completion_mask), v, b.completion_mask)
                token_adv.append(adv_t)
                returns.append(ret)
            # whiten over every token of the batch (micro-batches have different widths)
            flat = torch.cat([x[b.completion_mask > 0] for x, b in zip(token_adv, batches, strict=True)])
            mean, std = flat.mean(), flat.std(unbiased=False)
            token_adv = [
                ((x - mean) / (std + 1e-8)) * b.completion_mask for x, b in zip(token_adv, batches, strict=True)
            ]
        else:
            seq_adv = group_advantages(outcome, torch.arange(n) // a.group_size).advantage.float()
        tokens = sum(int(b.completion_mask.sum()) for b in batches)
        totals = BatchTotals(sequences=n, tokens=tokens, micro_batches=len(batches))
        out["before_update_mib"].append(status_mib("VmRSS"))
        reset_peak_rss()
        upd_started = time.perf_counter()
        policy.train()
        if value is not None:
            value.train(True)
        vloss_total = 0.0
        for k, (m, b) in enumerate(zip(micro, batches, strict=True)):
            logp = completion_logprobs(policy, b, 1.0)  # (b, C)
            if a.algorithm == "ppo":
                ratio = torch.exp(torch.where(b.completion_mask > 0, logp - olds[k], torch.zeros_like(logp)))
                pg = (clipped_surrogate(ratio, token_adv[k], CLIP, CLIP) * b.completion_mask).sum() / tokens
                vloss = clipped_value_loss(value(b), old_values[k], returns[k], b.completion_mask) / tokens
                (pg + VF_COEF * vloss).backward()
                vloss_total += vloss.item()
            else:
                loss, _ = policy_loss(
                    logp, logp.detach(), seq_adv[m], b.completion_mask, refs[k], loss_settings, totals
                )
                loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if value is not None:
            torch.nn.utils.clip_grad_norm_(value.parameters(), 1.0)
            value_opt.step()
            value_opt.zero_grad(set_to_none=True)
        policy.eval()
        out["update_seconds"].append(time.perf_counter() - upd_started)
        out["update_peak_mib"].append(status_mib("VmHWM"))
        out["seconds"].append(time.perf_counter() - started)
        out["rewards"].append(outcome.mean().item())
        out["value_loss"].append(vloss_total)
        if held_out and (it % a.eval_every == 0 or it == a.iterations):
            out["evals"][it] = _eval(policy, tok, held_out, a.max_new_tokens, reward)
    return out


def _pad(values, width):
    import torch

    out = torch.zeros((len(values), width), dtype=torch.float32)
    for i, v in enumerate(values):
        out[i, : len(v)] = torch.as_tensor(v, dtype=torch.float32)
    return out


def setup_task(a: argparse.Namespace):
    """(model folder, training problems, held-out problems, reward(text, example), chat template?)"""
    if a.model == "tiny":
        from data import builtin
        from rewards.arithmetic import exact_answer
        from tasks.tiny_model import ensure_tiny_model

        # the default run's model: 250 supervised warm-up steps with this seed
        return (
            str(ensure_tiny_model(steps=250, seed=a.seed)),
            builtin.all_train_problems(),
            builtin.held_out_problems(a.eval_size),
            exact_answer,
            False,
        )
    from smollm2 import final_number, smollm2_hf_folder, write_gsm_symbolic_jsonl

    folder = smollm2_hf_folder(ROOT / "benchmarks" / "out" / "smollm2-135m-instruct")
    rows = [
        json.loads(x)
        for x in write_gsm_symbolic_jsonl(ROOT / "benchmarks" / "out" / "gsm_symbolic.jsonl", 512)
        .read_text()
        .splitlines()
    ]
    return str(folder), rows, [], final_number, True


# ----------------------------------------------------------------------------- driver


def collapsed(evals: dict) -> bool:
    points = [evals[k] for k in sorted(evals, key=int)]
    return len(points) >= 3 and all(x < points[0] for x in points[-2:])


def drawdown(evals: dict) -> float:
    """The largest fall of held-out accuracy from its best so far: a run that learns and then
    unlearns shows it even when it ends above its start (which `collapsed` would miss)."""
    best, worst_fall = 0.0, 0.0
    for k in sorted(evals, key=int):
        best = max(best, evals[k])
        worst_fall = max(worst_fall, best - evals[k])
    return worst_fall


def summarize(results: list[dict], algorithms: list[str]) -> None:
    """Per algorithm, across seeds. The seeds' warmed-up models start at different accuracies,
    so the spread of the raw reward curves mostly measures where each seed started; the spread
    of each run's gain (mean reward of its last 5 iterations less its first 5) is the part the
    algorithm decides."""
    for algorithm in algorithms:
        rs = [r for r in results if r["algorithm"] == algorithm]
        if not rs:
            continue
        curves = list(zip(*[r["rewards"] for r in rs], strict=True))  # per iteration, across seeds
        spread = [statistics.pstdev(c) for c in curves] if len(rs) > 1 else [0.0]
        reward_gains = [statistics.mean(r["rewards"][-5:]) - statistics.mean(r["rewards"][:5]) for r in rs]
        gains = [r["evals"][max(r["evals"], key=int)] - r["evals"]["0"] for r in rs if r["evals"]]
        falls = [drawdown(r["evals"]) for r in rs if r["evals"]]
        peak_rises = [max(p - b for p, b in zip(r["update_peak_mib"], r["before_update_mib"], strict=True)) for r in rs]
        print(
            f"{algorithm:4s}: {len(rs)} runs; s/it median "
            f"{statistics.median(x for r in rs for x in r['seconds']):.2f}; "
            f"update peak median {statistics.median(max(r['update_peak_mib']) for r in rs):.0f} MiB "
            f"(+{statistics.median(peak_rises):.0f}"
            " over the RSS before it); reward spread across seeds (std per iteration) mean "
            f"{statistics.mean(spread):.3f} "
            f"max {max(spread):.3f}; reward gain (last 5 - first 5) mean {statistics.mean(reward_gains):+.3f} "
            f"std {statistics.pstdev(reward_gains):.3f}; held-out gain {' '.join(f'{g:+.3f}' for g in gains)}; "
            f"largest held-out fall from its best {' '.join(f'{x:.3f}' for x in falls)}; "
            f"collapsed {sum(collapsed(r['evals']) for r in rs)}"
        )


def plot(results: list[dict], path: Path) -> None:
    """Left: each algorithm's training reward, the seeds' mean with their min-max band. Right:
    every run's held-out curve, one colour per algorithm: a run that unlearns shows as a line
    falling away from its seed's other line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"grpo": "tab:blue", "ppo": "tab:orange"}
    fig, (reward_ax, held_out_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for algorithm in dict.fromkeys(r["algorithm"] for r in results):
        colour = colours.get(algorithm, "tab:gray")
        # One iteration's mean reward over 16 x 8 completions is noisy: a 5-iteration running
        # mean per seed, then the seeds' mean as the line and their min-max as the band.
        smoothed = [
            [statistics.mean(r["rewards"][max(0, i - 4) : i + 1]) for i in range(len(r["rewards"]))]
            for r in results
            if r["algorithm"] == algorithm
        ]
        per_iteration = list(zip(*smoothed, strict=True))
        its = range(1, len(per_iteration) + 1)
        reward_ax.plot(
            its,
            [statistics.mean(c) for c in per_iteration],
            color=colour,
            lw=1.5,
            label=f"{algorithm}: mean of {len(smoothed)} seeds",
        )
        reward_ax.fill_between(
            its,
            [min(c) for c in per_iteration],
            [max(c) for c in per_iteration],
            color=colour,
            alpha=0.2,
            label=f"{algorithm}: min-max over seeds",
        )
    for r in results:
        its = sorted(r["evals"], key=int)
        held_out_ax.plot(
            [int(i) for i in its],
            [r["evals"][i] for i in its],
            "o-",
            ms=3,
            lw=1,
            alpha=0.7,
            color=colours.get(r["algorithm"], "tab:gray"),
            label=f"{r['algorithm']} seed {r['seed']}",
        )
    reward_ax.legend(fontsize=7)
    reward_ax.set(xlabel="iteration", ylabel="mean training reward (5-iteration running mean)", title="training reward")
    held_out_ax.set(xlabel="iteration", ylabel="held-out greedy accuracy", title="held-out accuracy")
    for ax in (reward_ax, held_out_ax):
        ax.grid(alpha=0.3)
    held_out_ax.legend(fontsize=7, ncol=2)
    fig.suptitle("tiny default task: GRPO (no critic) vs PPO (policy-sized critic, GAE), same seeds", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"plot: {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=["tiny", "smollm2"])
    p.add_argument("--algorithms", default="grpo,ppo")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--micro-batch", type=int, default=64)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-size", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "ppo")
    p.add_argument("--summarize", type=Path, help="print the summary of a saved summary-*.json again and exit")
    p.add_argument("--plot", type=Path, help="also draw every run's reward and held-out curves into this PNG")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--algorithm")
    p.add_argument("--seed", type=int)
    p.add_argument("--worker-out", type=Path)
    a = p.parse_args()
    if a.summarize:
        saved = json.loads(a.summarize.read_text())
        summarize(saved["results"], saved["args"]["algorithms"].split(","))
        if a.plot:
            plot(saved["results"], a.plot)
        return
    if a.worker:
        set_threads(a.threads)
        a.worker_out.write_text(json.dumps(run_one(a)))
        return

    a.out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        for algorithm in a.algorithms.split(","):  # interleaved: both algorithms see the same stretch of load
            out = Path(tempfile.mkdtemp(dir=a.out)) / "result.json"
            cmd = [
                PYTHON,
                __file__,
                "--worker",
                "--algorithm",
                algorithm,
                "--seed",
                str(seed),
                "--worker-out",
                str(out),
            ]
            for key in (
                "model",
                "iterations",
                "prompts",
                "group_size",
                "max_new_tokens",
                "lr",
                "micro_batch",
                "eval_every",
                "eval_size",
                "threads",
            ):
                cmd += ["--" + key.replace("_", "-"), str(getattr(a, key))]
            proc = subprocess.run(
                cmd,
                cwd=ROOT,
                env={**os.environ, "OMP_NUM_THREADS": str(a.threads)},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            if proc.returncode:
                print(f"{algorithm} seed {seed} FAILED: {proc.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(out.read_text()) | {"load_average_after": os.getloadavg()}
            results.append(r)
            evals = " ".join(f"{k}:{v:.3f}" for k, v in r["evals"].items())
            print(
                f"{algorithm:4s} seed {seed}: s/it {statistics.median(r['seconds']):.2f} (update "
                f"{statistics.median(r['update_seconds']):.2f}), "
                f"update peak {max(r['update_peak_mib']):.0f} MiB "
                f"(+{max(p - b for p, b in zip(r['update_peak_mib'], r['before_update_mib'], strict=True)):.0f} over "
                f"the RSS before it), reward first/last 5 {statistics.mean(r['rewards'][:5]):.3f}/"
                f"{statistics.mean(r['rewards'][-5:]):.3f}, held-out {evals}, collapsed {collapsed(r['evals'])}, "
                f"load {' '.join(f'{x:.2f}' for x in r['load_average_after'])}",
                flush=True,
            )
    print()
    summarize(results, a.algorithms.split(","))
    if a.plot:
        plot(results, a.plot)
    (a.out / f"summary-{a.model}.json").write_text(
        json.dumps(
            {"machine": machine_info(), "args": {k: str(v) for k, v in vars(a).items()}, "results": results}, indent=1
        )
    )


if __name__ == "__main__":
    main()
