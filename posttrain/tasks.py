"""Tasks and data for the post-training methods (sft.py, dpo.py, grpo.py, ppo.py): the built-in
verifiable toy tasks and their word-level vocabulary, the examples a run trains and is evaluated on
(a toy task's or a dataset's), the rewards, reading prompt/completion and preference data, and
turning text pairs into padded token batches. The training plumbing is posttrain/common.py."""

import dataclasses
import importlib
import random
from pathlib import Path

from shared.tokenizer import ENDOFTEXT, Tokenizer

# -----------------------------------------------------------------------------
# Toy tasks: verifiable prompts whose answers are computed, and the word-level vocabulary they need


@dataclasses.dataclass(frozen=True)
class ToyTask:
    """Prompts drawn from a seeded RNG, answers computed from the prompt. Letters and numbers are
    written with spaces so each is one token, GPT-2's or task_vocabulary's: 'reverse: c a t =' -> ' t a c'."""

    name: str
    make: callable  # random.Random -> prompt
    solve: callable  # prompt -> answer (the completion, with its leading space)


LETTERS = "abcdefghijklmnopqrstuvwxyz"
ADDENDS = range(50)  # add's operands, so its answers are 0 to 98


def letters(rng, alphabet=LETTERS):
    return " ".join(rng.choice(alphabet) for _ in range(rng.randint(3, 5)))


def operands(prompt):  # 'reverse: c a t =' -> ['c', 'a', 't']
    return prompt.split(":", 1)[1].removesuffix("=").split()


TASKS = {
    task.name: task
    for task in (
        ToyTask("reverse", lambda rng: f"reverse: {letters(rng)} =", lambda p: " " + " ".join(operands(p)[::-1])),
        ToyTask("sort", lambda rng: f"sort: {letters(rng)} =", lambda p: " " + " ".join(sorted(operands(p)))),
        ToyTask(
            "add",
            lambda rng: f"add: {rng.choice(ADDENDS)} + {rng.choice(ADDENDS)} =",
            lambda p: f" {sum(int(x) for x in operands(p) if x != '+')}",
        ),
    )
}


def task_vocabulary():
    """The toy tasks' words as a word-level tokenizer (a Hugging Face tokenizer.json, so shared/tokenizer.py
    reads it back): each word with its leading space is one id, as it is in GPT-2 (' t'), and decoding
    joins the words as they were, so every prompt and answer round-trips exactly. 131 ids instead of
    GPT-2's 50,257: at the small config's width the embedding and head are then a small part of the model
    instead of 98% of it, and a CPU step is many times faster. Id 0 is the end of text."""
    import tokenizers
    from tokenizers import Regex, decoders, models, pre_tokenizers

    numbers = range(2 * max(ADDENDS) + 1)
    words = [ENDOFTEXT, *(f"{name}:" for name in TASKS), " =", " +", *(f" {c}" for c in LETTERS)]
    words += [f" {n}" for n in numbers]
    backend = tokenizers.Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}))  # no unknown word
    # 'reverse: c' -> 'reverse:', ' c': a word and the space before it
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?\S+"), behavior="isolated")
    backend.decoder = decoders.Fuse()  # concatenate, adding no spaces
    return Tokenizer(backend, eot_id=0, name="task")


# -----------------------------------------------------------------------------
# Examples and rewards: a toy task's stream or prompt/completion data, the held-out prompts, and a
# reward function f(prompts, completions) -> list[float] over decoded text


class Examples:
    """The training stream and the held-out evaluation prompts of a task or a dataset. Every process
    draws the same global batch from its own copy of the seeded RNG and keeps its share."""

    def __init__(self, args):
        self.rng = random.Random(args.seed)
        if args.data:
            rows = read_pairs(args.data)
            if len(rows) <= args.eval_prompts:
                raise SystemExit(f"--data {args.data}: {len(rows)} rows, not more than --eval-prompts")
            self.train, held_out = rows[: -args.eval_prompts], rows[-args.eval_prompts :]
            self.eval_prompts = [prompt for prompt, _ in held_out]
            self.answers = dict(rows)
        else:
            task, eval_rng = TASKS[args.task], random.Random(-1 - args.seed)  # another stream than training's
            self.eval_prompts = unique_prompts(task, eval_rng, args.eval_prompts, exclude=set())
            self.task, self.held_out = task, set(self.eval_prompts)
        self.reward = self.named_reward(args.reward) or load_reward(args.reward)

    def named_reward(self, name):
        return {"exact": self.exact_match, "partial": self.partial_credit}.get(name)

    def batch(self, n):
        """n (prompt, completion) pairs, none of them a held-out prompt."""
        if hasattr(self, "train"):
            return [self.rng.choice(self.train) for _ in range(n)]
        prompts = [self.draw_training_prompt() for _ in range(n)]
        return [(prompt, self.task.solve(prompt)) for prompt in prompts]

    def draw_training_prompt(self):
        while (prompt := self.task.make(self.rng)) in self.held_out:
            pass
        return prompt

    def answer(self, prompt):
        return self.answers[prompt] if hasattr(self, "answers") else self.task.solve(prompt)

    def exact_match(self, prompts, completions):
        return [float(completion == self.answer(prompt)) for prompt, completion in zip(prompts, completions)]

    def partial_credit(self, prompts, completions):
        return [words_in_place(completion, self.answer(prompt)) for prompt, completion in zip(prompts, completions)]


def words_in_place(completion, answer):
    """A dense reward for RL from a weak start: the share of positions where the completion has the answer's
    word, over the longer of the two (a missing or an extra word costs alike). 1 for the answer, 0 for an
    empty completion; ' t a x' -> 2/3 against ' t a c'. Exact match gives a policy that solves a fifth
    of the prompts a zero advantage on most groups; this ranks the near misses above the far ones."""
    got, want = completion.split(), answer.split()
    if not want:
        return float(not got)
    return sum(g == w for g, w in zip(got, want)) / max(len(got), len(want))


def unique_prompts(task, rng, n, exclude):
    prompts = []
    for _ in range(100 * n):
        prompt = task.make(rng)
        if prompt not in exclude and prompt not in prompts:
            prompts.append(prompt)
            if len(prompts) == n:
                return prompts
    raise SystemExit(f"--task {task.name}: cannot draw {n} distinct prompts; lower --eval-prompts")


def load_reward(path):
    """'package.module.function' (or 'package.module:function') -> the callable."""
    module, _, name = path.replace(":", ".").rpartition(".")
    try:
        reward = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise SystemExit(f"--reward {path}: cannot import it ({e})") from None
    if not callable(reward):
        raise SystemExit(f"--reward {path}: not a callable")
    return reward


# -----------------------------------------------------------------------------
# Data files: a .jsonl/.json or .parquet file, or a hub dataset


def read_table(name, columns):
    """A .jsonl/.json or .parquet file, or a hub dataset's train split, as a datasets.Dataset that has
    (at least) `columns`; any problem is one line naming the input."""
    import datasets

    kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(Path(name).suffix)
    try:
        data = datasets.load_dataset(kind, data_files=name, split="train") if kind else datasets.load_dataset(name)
        data = data["train"] if isinstance(data, datasets.DatasetDict) else data
    except Exception as e:  # datasets raises many kinds: one line naming the input
        raise SystemExit(f"--data {name}: cannot read it ({type(e).__name__}: {e})") from None
    missing = set(columns) - set(data.column_names)
    if missing:
        raise SystemExit(f"--data {name}: no {', '.join(sorted(missing))} column (has {', '.join(data.column_names)})")
    return data


def read_pairs(name):
    """[(prompt, completion)] from a .jsonl/.json or .parquet file, or a hub dataset's train split."""
    data = read_table(name, ("prompt", "completion"))
    return list(zip(data["prompt"], data["completion"]))


# -----------------------------------------------------------------------------
# Preference pairs (DPO): TRL's standard format (prompt, chosen, rejected), or pairs built from a toy task
# (the right answer chosen, the same answer with one word changed rejected)

PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")  # the names TRL's precompute_ref_logps writes


def corrupt(answer, rng):
    """The answer with one word changed: a letter replaced by another, or a number moved by 1 or 10 within add's
    answers (the task vocabulary holds no others)."""
    words = answer.split()
    i = rng.randrange(len(words))
    if words[i].isdigit():
        moved = [int(words[i]) + d for d in (-10, -1, 1, 10)]
        words[i] = str(rng.choice([n for n in moved if 0 <= n <= 2 * max(ADDENDS)]))
    else:
        words[i] = rng.choice([c for c in LETTERS if c != words[i]])
    return " " + " ".join(words)


class Preferences(Examples):
    """Training pairs and held-out pairs, each a dict with PREFERENCE_COLUMNS (and REF_COLUMNS when the
    data carries precomputed reference log-probs). The held-out prompts' chosen completions are also
    the answers of the exact-match reward measured before and after."""

    def __init__(self, args):
        if not args.data:
            super().__init__(args)
            eval_rng = random.Random(-1 - args.seed)
            self.eval_pairs = [self.toy_pair(prompt, eval_rng) for prompt in self.eval_prompts]
            return
        self.rng = random.Random(args.seed)
        rows = read_preferences(args.data)
        if len(rows) <= args.eval_prompts:
            raise SystemExit(f"--data {args.data}: {len(rows)} rows, not more than --eval-prompts")
        self.train, self.eval_pairs = rows[: -args.eval_prompts], rows[-args.eval_prompts :]
        self.eval_prompts = [row["prompt"] for row in self.eval_pairs]
        self.answers = {row["prompt"]: row["chosen"] for row in rows}
        self.reward = self.named_reward(args.reward) or load_reward(args.reward)

    def toy_pair(self, prompt, rng):
        answer = self.task.solve(prompt)
        return {"prompt": prompt, "chosen": answer, "rejected": corrupt(answer, rng)}

    def batch(self, n):
        """n pairs, none of them on a held-out prompt."""
        if hasattr(self, "train"):
            return [self.rng.choice(self.train) for _ in range(n)]
        return [self.toy_pair(self.draw_training_prompt(), self.rng) for _ in range(n)]


def read_preferences(name):
    """[{prompt, chosen, rejected[, ref_chosen_logps, ref_rejected_logps]}] from a .jsonl/.json or .parquet
    file or a hub dataset's train split, plain text (TRL's standard, not conversational, format)."""
    data = read_table(name, PREFERENCE_COLUMNS)
    refs = [c for c in REF_COLUMNS if c in data.column_names]
    if len(refs) == 1:
        raise SystemExit(f"--data {name}: has {refs[0]} but not its partner; precomputed reference log-probs need both")
    rows = data.select_columns([*PREFERENCE_COLUMNS, *refs]).to_list()
    if not all(isinstance(row[c], str) for row in rows for c in PREFERENCE_COLUMNS):
        raise SystemExit(
            f"--data {name}: prompt/chosen/rejected must be plain strings (conversational rows are not read)"
        )
    return rows


# -----------------------------------------------------------------------------
# Token batches: prompt then completion, right-padded, with the mask of the completion tokens


def encode_pairs(tokenizer, pairs):
    """[(prompt, completion)] -> ([prompt ids], [completion ids + EOT]): the EOT teaches the policy to stop."""
    prompts = [tokenizer.encode(prompt) for prompt, _ in pairs]
    completions = [tokenizer.encode(completion) + [tokenizer.eot_id] for _, completion in pairs]
    return prompts, completions


def collate(prompts, completions, pad_id, device):
    """Token lists -> ids (B, L), prompt then completion, right-padded; mask (B, L) 1 on completion tokens.
    Right padding needs no attention mask: causal attention never lets a real token see the padding."""
    import torch  # here, not at the top: posttrain/cli.py reads TASKS before torch is imported

    rows = [p + c for p, c in zip(prompts, completions)]
    L = max(map(len, rows))
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), L)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        mask[i, len(p) : len(p) + len(c)] = 1.0
    return ids.to(device), mask.to(device)


def check_lengths(prompts, args, block_size):
    longest = max(map(len, prompts))
    if longest + args.max_new_tokens > block_size:
        raise SystemExit(
            f"a prompt of {longest} tokens + --max-new-tokens {args.max_new_tokens} exceeds the policy's "
            f"block_size {block_size}"
        )
